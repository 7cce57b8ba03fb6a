"""What a launcher (``torchrun``, ``accelerate launch``) tells a process through its environment.

Read before torch is imported (the CLI decides what to print and check from it), so this module
imports nothing heavy. Joining the process group is ``train/distributed.py``'s; starting ranks in a
cloud job is ``job/launch.py``'s.
"""

from __future__ import annotations

import os


def launched_world_size(environ: dict[str, str] | None = None) -> int:
    """The world size a launcher announced (``WORLD_SIZE``), 1 without one."""
    environ = os.environ if environ is None else environ
    try:
        return max(1, int(environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched_rank(environ: dict[str, str] | None = None) -> int:
    """This process's global rank (``RANK``), 0 without a launcher."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("RANK") or 0) if launched_world_size(environ) > 1 else 0
    except ValueError:
        return 0


def is_main_process(environ: dict[str, str] | None = None) -> bool:
    """Rank 0 of a launched job, or a process started on its own."""
    return launched_rank(environ) == 0
