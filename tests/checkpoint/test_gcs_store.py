"""The ``gs://`` store for real: gcsfs against a GCS JSON-API server on loopback (gcp-storage-emulator).

The same checks as S3 gets against moto: publish, aliases, resume from ``gs://...:latest``, and an
endpoint that fails.
"""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("gcsfs")
from dylora_moe.checkpoint.format import verify_checkpoint  # noqa: E402
from dylora_moe.checkpoint.references import fetch, find_auto  # noqa: E402
from dylora_moe.checkpoint.stores import FsspecStore, open_store  # noqa: E402
from dylora_moe.errors import CheckpointError  # noqa: E402
from tests.cloud.gcs_emulator import gcs_emulator  # noqa: E402  (sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT first)


@pytest.fixture(scope="module")
def gcs():
    with gcs_emulator("ckpt") as url:
        yield url


def new_prefix() -> str:
    return f"gs://ckpt/{uuid.uuid4().hex}/run1/store"


def test_publish_aliases_and_listing(gcs, ckpts):
    _, make = ckpts
    store = open_store(new_prefix())
    assert isinstance(store, FsspecStore) and store.fs.protocol[0] in ("gs", "gcs")
    assert store.publish(make(10), 10, ["latest", "best"]) == "v0"
    assert store.publish(make(20), 20) == "v1"
    assert store.resolve("latest") == "v1" and store.resolve("best") == "v0" and store.resolve("step-10") == "v0"
    assert [(v.version, v.step, v.aliases) for v in store.list_versions()] == [
        ("v0", 10, ("best", "step-10")), ("v1", 20, ("latest", "step-20"))]
    # What is in the bucket is what the checkpoint holds, byte for byte.
    local = ckpts[0] / "step-00000020" / "trainable.safetensors"
    assert store.fs.cat_file(f"{store.root}/v1/trainable.safetensors") == local.read_bytes()


def test_resume_from_gs_latest(gcs, ckpts, tmp_path):
    _, make = ckpts
    prefix = new_prefix()
    store = open_store(prefix)
    store.publish(make(10), 10)
    store.publish(make(30), 30)
    path = fetch(f"{prefix}:latest", tmp_path / "downloads")
    manifest = verify_checkpoint(path)
    assert manifest.global_step == 30
    assert (path / "data_state.json").read_bytes() == (ckpts[0] / "step-00000030" / "data_state.json").read_bytes()
    # `--resume auto` with no local checkpoint finds the store's newest version.
    assert find_auto(tmp_path / "fresh-run", store) == f"{prefix}:v1"
    # A version that does not exist is an error that lists what does.
    with pytest.raises(CheckpointError,
                       match=r"'v9' is not a complete version or alias.*available versions: \['v0', 'v1'\]"):
        fetch(f"{prefix}:v9", tmp_path / "downloads")


@pytest.mark.slow  # gcsfs retries a refused connection with back-off for about 30 s
def test_a_failing_endpoint_is_an_error_naming_the_store(gcs, ckpts, monkeypatch):
    prefix = new_prefix()
    store = open_store(prefix)
    store.publish(ckpts[1](10), 10)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nothing listens on the discard port
    dead = FsspecStore(prefix, storage_options={"skip_instance_cache": True})
    with pytest.raises(CheckpointError) as err:
        dead.publish(ckpts[0] / "step-00000010", 10)
    message = str(err.value)
    assert message.startswith(f"Store {prefix} failed") and "Cannot connect to host 127.0.0.1:9" in message
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    # Nothing was half-published: the store still holds exactly v0, and `latest` points at it.
    assert [v.version for v in open_store(prefix).list_versions()] == ["v0"]
    assert open_store(prefix).resolve("latest") == "v0"


def test_a_missing_bucket_is_an_error_naming_the_store(gcs, ckpts):
    prefix = "gs://no-such-bucket/run1/store"
    with pytest.raises(CheckpointError) as err:
        open_store(prefix).publish(ckpts[1](10), 10)
    assert str(err.value).startswith(f"Store {prefix} failed")
