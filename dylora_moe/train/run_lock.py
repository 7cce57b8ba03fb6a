"""An exclusive lock on a run directory, so two processes never train the same run at once.

The lock is a kernel ``flock`` on ``RUN_DIR/.lock``: the kernel releases it when the holder
exits in any way, ``kill -9`` included, so a stale lock never blocks a restart. The file also
holds the holder's pid and host, for the message a second process gets. ``flock`` is advisory
and local: processes on two machines sharing a network file system are not excluded by it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import DyLoRAError

LOCK_NAME = ".lock"


class RunLocked(DyLoRAError):
    """Another live process holds the run directory."""

    exit_code = 1


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(
                f"run directory {self.path.parent} is in use by another run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, since {holder.get('since', '?')}): two processes training the same "
                "run would overwrite each other's checkpoints. Wait for it to finish or stop it, or use another "
                "--run_id or --output_dir.") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __del__(self) -> None:  # a trainer set up and dropped without training must not keep the run locked
        self.release()

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
