"""Store round trips on real backends: a local directory, file://, memory:// and S3 (moto)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from dylora_moe.checkpoint.format import verify_checkpoint
from dylora_moe.checkpoint.stores import FsspecStore, LocalStore, open_store
from dylora_moe.checkpoint.stores import download as store_download
from dylora_moe.errors import CheckpointError

BACKENDS = ["local", "file", "memory", "s3"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    kind = request.param
    if kind == "local":
        return LocalStore(tmp_path / "store")
    if kind == "file":
        return FsspecStore((tmp_path / "store").as_uri())
    if kind == "memory":
        return FsspecStore(f"memory://ckpt-{uuid.uuid4().hex}/run1")
    endpoint = request.getfixturevalue("s3_endpoint")
    return FsspecStore(f"s3://ckpt/{uuid.uuid4().hex}/run1",
                       storage_options={"client_kwargs": {"endpoint_url": endpoint}})


def corrupt(store, key: str) -> None:
    """Flip one byte of a stored object, through the backend itself."""
    data = bytearray(store._read(key))
    data[0] ^= 0xFF
    if isinstance(store, LocalStore):
        (store.root / key).write_bytes(bytes(data))
    else:
        store.fs.pipe_file(store._path(key), bytes(data))


def test_publish_resolve_download_round_trip(store, ckpts, tmp_path):
    _, make = ckpts
    assert store.list_versions() == []
    assert store.publish(make(10), 10, ["latest", "best"]) == "v0"
    assert store.publish(make(20), 20) == "v1"
    assert store.resolve("latest") == "v1" and store.resolve("best") == "v0"
    assert store.resolve("step-10") == "v0" and store.resolve("v1") == "v1"
    infos = store.list_versions()
    assert [(v.version, v.step, v.aliases) for v in infos] == [
        ("v0", 10, ("best", "step-10")), ("v1", 20, ("latest", "step-20"))]
    assert infos[0].size == verify_checkpoint(ckpts[0] / "step-00000010").total_size
    dest = store.download("best", tmp_path / "dl" / "best")
    manifest = verify_checkpoint(dest)
    assert manifest.global_step == 10
    assert (dest / "trainable.safetensors").read_bytes() == (
        ckpts[0] / "step-00000010" / "trainable.safetensors").read_bytes()
    # Downloading again into the same place reuses the verified copy.
    assert store.download("v0", dest) == dest
    with pytest.raises(CheckpointError, match="already exists and holds something else"):
        store.download("v1", dest)


def test_publish_never_overwrites_and_latest_never_moves_back(store, ckpts):
    _, make = ckpts
    first = make(20)
    assert store.publish(first, 20) == "v0"
    before = store._read("v0/manifest.json")
    assert store.publish(first, 20) == "v1"  # same checkpoint again: a new version
    assert store._read("v0/manifest.json") == before
    assert store.publish(make(10), 10) == "v2"  # an older step published late
    assert store.resolve("latest") == "v1" and store.resolve("step-10") == "v2"


def test_failed_upload_leaves_version_incomplete_and_aliases_unmoved(store, ckpts):
    _, make = ckpts
    store.publish(make(10), 10, ["latest", "best"])
    upload = store._upload

    def flaky_upload(local: Path, key: str) -> None:
        if key.endswith("optimizer/state.json"):
            raise ConnectionError("connection reset by peer")
        upload(local, key)

    store._upload = flaky_upload
    with pytest.raises(CheckpointError) as err:
        store.publish(make(20), 20, ["latest", "best"])
    message = str(err.value)
    assert "uploading optimizer/state.json" in message and "no alias was moved" in message
    assert "connection reset by peer" in message
    assert store.resolve("latest") == "v0" and store.resolve("best") == "v0"
    assert [v.version for v in store.list_versions()] == ["v0"]
    with pytest.raises(CheckpointError, match="'v1' is not a complete version or alias"):
        store.resolve("v1")
    store._upload = upload
    assert store.publish(ckpts[0] / "step-00000020", 20) == "v2"  # v1 is never reused
    assert store.resolve("latest") == "v2"


def test_unknown_reference_lists_versions_and_aliases(store, ckpts):
    store.publish(ckpts[1](10), 10)
    with pytest.raises(CheckpointError) as err:
        store.resolve("best")
    message = str(err.value)
    assert "'best' is not a complete version or alias" in message
    assert "available versions: ['v0']; aliases: ['latest', 'step-10']" in message
    with pytest.raises(CheckpointError, match="is not a valid version or alias"):
        store.resolve("../v0")


def test_corrupted_download_names_the_file_and_leaves_nothing(store, ckpts, tmp_path):
    store.publish(ckpts[1](10), 10)
    corrupt(store, "v0/data_state.json")
    dest = tmp_path / "dl" / "ck"
    with pytest.raises(CheckpointError, match="data_state.json has sha256 .* the manifest expects"):
        store.download("latest", dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_download_checks_free_disk_space_first(store, ckpts, tmp_path, monkeypatch):
    store.publish(ckpts[1](10), 10)
    fetched = []
    monkeypatch.setattr(store, "_download", lambda key, path: fetched.append(key))
    monkeypatch.setattr(store_download.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000}))
    with pytest.raises(CheckpointError, match=r"Not enough free disk space .* has 0\.0 MB free"):
        store.download("latest", tmp_path / "dl")
    assert fetched == []


def test_publish_refuses_unverified_or_mislabelled_checkpoints(store, ckpts):
    path = ckpts[1](10)
    with pytest.raises(CheckpointError, match="its manifest says global_step 10"):
        store.publish(path, 11)
    (path / "stray.txt").write_text("x")
    with pytest.raises(CheckpointError, match="stray.txt is not listed"):
        store.publish(path, 10)
    with pytest.raises(CheckpointError, match="looks like a version name"):
        store.publish(ckpts[1](20), 20, ["v7"])
    assert store.list_versions() == []


def test_local_store_layout(tmp_path, ckpts):
    store = LocalStore.for_run_dir(tmp_path / "run")
    store.publish(ckpts[1](10), 10, ["latest"])
    assert store.root == tmp_path / "run" / "store"
    assert (store.root / "v0" / "manifest.json").is_file()
    assert sorted(p.name for p in (store.root / "aliases").iterdir()) == ["latest.json",
                                                                          "step-10.json"]
    # The same layout reads back through file:// (what ref_for hands to references.fetch).
    assert store.ref_for("v0") == (tmp_path / "run" / "store").as_uri() + ":v0"
    assert FsspecStore(store.url).resolve("latest") == "v0"
    # No address is the run's own store; "wandb" needs the active W&B run.
    assert open_store(None, run_dir=tmp_path / "run").url == store.url
    assert open_store("", run_dir=tmp_path / "run").list_versions()[0].step == 10
    with pytest.raises(CheckpointError, match="'wandb' is the checkpoint artifact of the active W&B run"):
        open_store("wandb")


def test_s3_endpoint_from_environment(s3_endpoint, ckpts, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    store = open_store(f"s3://ckpt/{uuid.uuid4().hex}")
    assert store.publish(ckpts[1](10), 10) == "v0"
    assert store.fs.client_kwargs["endpoint_url"] == s3_endpoint


def test_open_store_errors(without_gcsfs):
    with pytest.raises(CheckpointError, match=r"needs the package gcsfs .*pip install gcsfs"):
        open_store("gs://bucket/run1")
    with pytest.raises(CheckpointError, match=r"unsupported scheme; accepted: file://"):
        open_store("ftp://host/run1")
    with pytest.raises(CheckpointError, match="expected wandb://ENTITY/PROJECT/NAME"):
        open_store("wandb://entity/project")
