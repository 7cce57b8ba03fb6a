"""One training rank started by the entrypoint's launcher: ``python -m dylora_moe.job.rank ARGS``.

Runs ``dylora ARGS`` in this process (the launcher set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), then records its exit status in ``$DYLORA_RANK_STATUS_DIR/
local-rank-LOCAL_RANK``. The launcher reports the status of ranks that fail on their own; when
the machine itself is told to stop (SIGTERM), it forwards the signal and waits, and these records
are how the entrypoint learns whether every rank checkpointed and exited 75.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def record_status(status: int, environ: dict[str, str] | None = None) -> None:
    environ = os.environ if environ is None else environ
    folder = environ.get("DYLORA_RANK_STATUS_DIR")
    if not folder:
        return
    target = Path(folder) / f"local-rank-{environ.get('LOCAL_RANK', '0')}"
    partial = target.with_suffix(".partial")
    partial.write_text(f"{status}\n")
    os.replace(partial, target)  # whole or absent: a reader never sees half a number


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as dylora_main

    status = 1
    try:
        status = dylora_main(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:  # argparse: --help, a usage error
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        record_status(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
