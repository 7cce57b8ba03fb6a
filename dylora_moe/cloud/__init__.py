"""Running training in the cloud: Vertex AI CustomJobs (``vertex``), secrets resolved in the
container (``secrets``), the container's entrypoint (``entrypoint``), the ranks of a multi-node or
multi-GPU job (``rendezvous`` from Vertex's CLUSTER_SPEC, ``launch`` with torch's launcher, ``rank``
for each process) and the ``dylora submit`` command (``command``). Needs the ``cloud`` extra:
``pip install 'dylora-moe[cloud]'``."""
