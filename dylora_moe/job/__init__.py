"""The container's side of a cloud job: what runs inside the image that ``dylora submit`` sends.

``entrypoint`` (``python -m dylora_moe.job.entrypoint``: secrets, ``$(VAR)`` expansion, then ``dylora
ARGS``), ``rendezvous`` (a multi-node or multi-GPU job's ranks, from Vertex's CLUSTER_SPEC), ``launch``
(this machine's ranks with torch's launcher, and their one exit status) and ``rank`` (each launched
process). It sits above everything: it runs the ``dylora`` command line (``cli``); nothing imports it.
"""
