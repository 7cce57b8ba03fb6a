import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# gcsfs's experimental zonal/HNS class probes a bucket's type over gRPC, which the GCS emulator the tests
# start does not speak (each probe waits up to 60 s): the tests use the JSON-API class, whichever test
# imports gcsfs first (see tests/cloud/gcs_emulator.py)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("DYLORA_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def without_gcsfs(monkeypatch):
    """As on an install without the optional `gcs` extra: gcsfs cannot be imported, and fsspec has not
    cached it from an earlier test of this session."""
    import importlib

    registry = importlib.import_module("fsspec.registry")  # the module; `fsspec.registry` is its read-only view
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    for protocol in ("gs", "gcs"):
        monkeypatch.delitem(registry._registry, protocol, raising=False)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on a random loopback port with bucket 'ckpt', for the real s3fs client."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}.items():
        mp.setenv(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    s3.mkdir("ckpt")
    yield endpoint
    server.stop()
    mp.undo()
