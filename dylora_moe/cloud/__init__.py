"""The submitting side of cloud training: the ``dylora submit vertex | status | cancel`` command
(``command``), Vertex AI CustomJobs (``vertex``), Secret Manager references (``secrets``, whose values
the container resolves) and Google API error messages (``api_errors``). What runs inside the
container is ``dylora_moe.job``; nothing here imports it or the CLI. Needs the ``cloud`` extra:
``pip install google-cloud-aiplatform google-cloud-secret-manager gcsfs`` (the ``cloud`` extra)."""
