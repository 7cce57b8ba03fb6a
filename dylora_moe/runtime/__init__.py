"""What every ``dylora`` process needs, whichever command it runs: SIGTERM/SIGINT and start-up
interruption (``signals``), what a launcher such as torchrun announced (``launcher``), where metrics
go (``tracking``: W&B, TensorBoard) and flag values spelled alike by every command (``flags``).

Imports nothing of ``dylora_moe`` but ``errors``, and nothing heavy at import time, so the CLI can
use it before torch loads.
"""
