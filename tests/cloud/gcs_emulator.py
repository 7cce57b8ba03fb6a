"""A real GCS JSON-API server on loopback (PyPI ``gcp-storage-emulator``) for ``gcsfs``.

``gcsfs`` talks to it when ``STORAGE_EMULATOR_HOST`` is set (anonymous access).

The emulator serves the JSON API only. gcsfs imported without ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``
in the environment makes ``gcsfs.GCSFileSystem`` its experimental zonal/HNS class, which asks for
each bucket's type over gRPC before most calls and, with anonymous credentials, waits up to 60 s
for that TLS handshake to fail against the emulator, on every call (a failed lookup is not cached).
This module sets the variable for gcsfs imported later and for subprocesses, but a test session may
have imported gcsfs already (``pytest.importorskip("gcsfs")`` in a module collected earlier), so
the tests' own client, :func:`emulator_fs`, is always gcsfs's plain JSON-API class.
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


def emulator_fs():
    """A fresh anonymous gcsfs client of the emulator at ``STORAGE_EMULATOR_HOST``: the JSON-API class,
    whatever ``gcsfs.GCSFileSystem`` became when gcsfs was first imported."""
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(project="test", token="anon", skip_instance_cache=True)


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
        fs = emulator_fs()
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
