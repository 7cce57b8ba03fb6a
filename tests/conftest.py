import os
import shutil
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


# Tests marked `needs_bwrap` run generated code in the full bubblewrap sandbox. `make test` installs
# bubblewrap where it can (as root, through apt); where it cannot, those tests are skipped and the run
# ends with one line saying what to install. CI (CI=true) never skips them: a missing bwrap fails them.
BWRAP = shutil.which("bwrap")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BWRAP_FIXTURES = {"bwrap_sandbox", "pool"}
_bwrap_skipped: list[str] = []


def pytest_collection_modifyitems(config, items):
    if BWRAP is not None or IN_CI:
        return
    skip = pytest.mark.skip(reason="needs bubblewrap: apt-get install bubblewrap")
    for item in items:
        if needs_bwrap(item):
            item.add_marker(skip)
            _bwrap_skipped.append(item.nodeid)


def needs_bwrap(item) -> bool:
    """Marked, or using a fixture that starts the bubblewrap sandbox (tests/eval/conftest.py)."""
    return bool(item.get_closest_marker("needs_bwrap")) or bool(BWRAP_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_runtest_setup(item):
    if IN_CI and BWRAP is None and needs_bwrap(item):
        pytest.fail("CI=true and no 'bwrap' is on PATH: the sandbox tests must run in CI "
                    "(.ci/run installs bubblewrap with apt-get)", pytrace=False)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if _bwrap_skipped:
        terminalreporter.write_line(
            f"{len(_bwrap_skipped)} sandbox tests skipped: bubblewrap is not installed "
            "(sudo apt-get install bubblewrap, or run `make test` as root, which installs it)", yellow=True, bold=True)


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
