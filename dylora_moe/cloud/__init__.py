"""Running training in the cloud: Vertex AI CustomJobs (``vertex``), secrets resolved in the
container (``secrets``), the container's entrypoint (``entrypoint``) and the ``dylora submit``
command (``command``). Needs the ``cloud`` extra: ``pip install 'dylora-moe[cloud]'``."""
