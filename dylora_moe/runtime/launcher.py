"""What a launcher (``torchrun``, ``accelerate launch``) tells a process through its environment.

Read before torch is imported (the CLI decides what to print and check from it), so this module
imports nothing heavy. Joining the process group is ``train/distributed.py``'s; starting ranks in a
cloud job is ``job/launch.py``'s.
"""

from __future__ import annotations

import os
import sys


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


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """Started by torch's elastic launcher (``torchrun``, ``python -m torch.distributed.run``)."""
    environ = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in environ


def stop_with_the_launcher() -> bool:
    """Under torchrun, ask Linux to send this rank SIGTERM when its launcher dies (``PR_SET_PDEATHSIG``).

    A launcher killed with SIGKILL cannot stop its ranks; without this they train on alone to the end,
    holding the run directory, so a supervisor's immediate restart is refused as "in use". With it
    they checkpoint and exit 75 as on any SIGTERM. Whether it was set (Linux under torchrun only).
    """
    if not launched_by_torchrun() or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != launcher:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
    return True
