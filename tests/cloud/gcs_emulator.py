"""A real GCS JSON-API server on loopback (PyPI ``gcp-storage-emulator``) for ``gcsfs``.

``gcsfs`` talks to it when ``STORAGE_EMULATOR_HOST`` is set (anonymous access).
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` must be in the environment before gcsfs is imported:
otherwise gcsfs probes each bucket over gRPC and waits 60 s for that to fail against the emulator.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

EMULATOR = Path(sys.executable).with_name("gcp-storage-emulator")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gcs_emulator(*buckets: str):
    """Start the emulator (in memory) with ``buckets``; yields its URL for STORAGE_EMULATOR_HOST."""
    port = _free_port()
    proc = subprocess.Popen([str(EMULATOR), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gcp-storage-emulator did not start on port {port}")
                time.sleep(0.1)
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = url
        import gcsfs

        fs = gcsfs.GCSFileSystem(project="test", token="anon", skip_instance_cache=True)
        for bucket in buckets:
            fs.mkdir(bucket)
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous
    finally:
        proc.terminate()
        proc.wait(timeout=10)
