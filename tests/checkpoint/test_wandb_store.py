"""The W&B store with the real client: publishing offline (staged) and online, and verified
downloads, against the fake W&B backend (tests/fakes/wandb_server.py)."""

from __future__ import annotations

import glob
import hashlib
import json
import re
from pathlib import Path

import pytest

from dylora_moe.checkpoint.references import fetch
from dylora_moe.checkpoint.stores import open_store
from dylora_moe.checkpoint.stores.wandb_store import FINAL_BEST_NAME, WandbStore
from dylora_moe.errors import CheckpointError
from tests.checkpoint.conftest import make_checkpoint
from tests.conftest import free_port
from tests.fakes.wandb_client import client_env
from tests.fakes.wandb_server import ENTITY, FakeWandb

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline_run(tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                        "WANDB_DIR": tmp_path / "wandb-dir", "WANDB_DATA_DIR": tmp_path / "data",
                        "WANDB_CACHE_DIR": tmp_path / "cache",
                        "WANDB_CONFIG_DIR": tmp_path / "config"}.items():
        if isinstance(value, Path):
            value.mkdir()
        monkeypatch.setenv(name, str(value))
    run = wandb.init(entity="team", project="dylora", id="run1")
    yield run
    finish(run)


def finish(run) -> bytes:
    """Finish the run and stop the W&B service, so the offline run record is complete on disk
    (and the next test's settings are read afresh); return that record."""
    run.finish()
    wandb.teardown()
    records = glob.glob(str(Path(run.dir).parent / "run-*.wandb"))
    return Path(records[0]).read_bytes() if records else b""


def sha256s(paths) -> set[str]:
    return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


def test_offline_publish_stages_our_files(offline_run, ckpts, tmp_path):
    store = WandbStore.for_run(offline_run)
    assert store.url == "wandb://team/dylora/run1-checkpoint"
    assert open_store("wandb", run=offline_run).url == store.url  # the address of this run's artifact
    path = ckpts[1](10)
    # Offline, W&B has no version number yet; the step alias names the version after sync.
    assert store.publish(path, 10, ["latest", "best"]) == "step-10"
    ours = sha256s(path.rglob("*"))
    assert len(ours) == 4  # three payload files and manifest.json
    assert ours <= sha256s((tmp_path / "data" / "artifacts" / "staging").iterdir())
    logged = finish(offline_run)
    assert str(tmp_path / "wandb-dir" / "wandb" / "offline-run-") in offline_run.dir
    manifest_sha256 = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    for needle in (b"run1-checkpoint", b"step-10", b"best", b"optimizer/state.json",
                   b"manifest.json", manifest_sha256.encode()):
        assert needle in logged


def test_offline_publish_final_best_stages_the_checkpoint(offline_run, ckpts, tmp_path):
    """best-dylora-model-full is the best checkpoint itself (resumable, verifiable), not an export."""
    store = WandbStore.for_run(offline_run)
    path = ckpts[1](10)
    assert store.publish_final_best(path, 10) == "step-10"
    staged = sha256s((tmp_path / "data" / "artifacts" / "staging").iterdir())
    assert sha256s(path.rglob("*")) <= staged
    assert FINAL_BEST_NAME.encode() in finish(offline_run)


def test_publish_needs_a_run(ckpts):
    with pytest.raises(CheckpointError, match="needs an active W&B run"):
        WandbStore("team", "dylora", "run1-checkpoint").publish(ckpts[1](10), 10)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """The fake W&B backend (tests/fakes/wandb_server.py) holding ``run1-checkpoint`` v0 (step 10,
    alias step-10) and v1 (step 20: latest, best, step-20), published by the real client online
    through ``WandbStore.publish``; yields (fake, {step: local checkpoint})."""
    root = tmp_path_factory.mktemp("wandb-backend")
    with FakeWandb() as fake:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in client_env(fake.url, root / "publisher", WANDB_SILENT="true").items():
                mp.setenv(name, value)
            run = wandb.init(project="dylora", id="run1")
            store = WandbStore.for_run(run)
            sources = {step: make_checkpoint(root / "checkpoints", step) for step in (10, 20)}
            assert store.publish(sources[10], 10, []) == "v0"
            assert store.publish(sources[20], 20, ["latest", "best"]) == "v1"
            finish(run)
        yield fake, sources
    assert not fake.errors, fake.errors


@pytest.fixture
def reader(backend, tmp_path, monkeypatch):
    """This test's process as a fresh machine reading the backend: its own empty W&B cache."""
    fake, sources = backend
    for name, value in client_env(fake.url, tmp_path / "reader", WANDB_SILENT="true").items():
        monkeypatch.setenv(name, value)
    yield fake, sources
    wandb.teardown()  # the client keeps its settings (key, base URL) in-process until told to forget


def store_of(entity=ENTITY, project="dylora", name="run1-checkpoint") -> WandbStore:
    return WandbStore(entity, project, name)


def file_downloads(fake) -> int:
    return sum(1 for method, path, _ in fake.requests if method == "GET" and path.startswith("/artifact-files/"))


def test_publish_online_creates_versions_and_aliases(backend):
    fake, sources = backend
    versions = fake.artifacts.versions(ENTITY, "dylora", "run1-checkpoint")
    assert [(v.version, json.loads(v.metadata)["step"]) for v in versions] == [("v0", 10), ("v1", 20)]
    assert fake.artifacts.aliases(ENTITY, "dylora", "run1-checkpoint") == {
        "step-10": "v0", "latest": "v1", "best": "v1", "step-20": "v1"}
    for version, step in zip(versions, (10, 20)):
        assert version.files == {p.relative_to(sources[step]).as_posix(): p.read_bytes()
                                 for p in sources[step].rglob("*") if p.is_file()}
        assert json.loads(version.metadata)["manifest_sha256"] == \
            hashlib.sha256(version.files["manifest.json"]).hexdigest()


def test_download_is_verified_and_lists_versions(reader, tmp_path):
    fake, sources = reader
    store = store_of()
    assert store.resolve("best") == "v1" and store.resolve("v0") == "v0"
    dest = store.download("best", tmp_path / "dl")
    assert sha256s(dest.rglob("*")) == sha256s(sources[20].rglob("*"))
    assert [(v.version, v.step, set(v.aliases)) for v in store.list_versions()] == [
        ("v0", 10, {"step-10"}), ("v1", 20, {"latest", "best", "step-20"})]


def test_corrupted_download_is_caught_naming_the_file(reader, tmp_path):
    fake, _ = reader
    version = fake.artifacts.corrupt(ENTITY, "dylora", "run1-checkpoint:v1", "trainable.safetensors")
    try:
        with pytest.raises(CheckpointError) as err:
            store_of().download("latest", tmp_path / "dl")
    finally:
        version.corrupted.clear()
    message = str(err.value)
    assert "trainable.safetensors has sha256" in message and "W&B cache" in message
    assert not (tmp_path / "dl").exists()


def test_an_online_run_uses_a_version_and_downloads_it(reader, tmp_path):
    """``run.use_artifact`` (the other way users download) against the same backend."""
    fake, sources = reader
    run = wandb.init(project="dylora", id="reader-run")
    try:
        artifact = run.use_artifact(f"{ENTITY}/dylora/run1-checkpoint:best")
        root = artifact.download(root=str(tmp_path / "used"))
        assert artifact.version == "v1"
    finally:
        finish(run)
    assert sha256s(Path(root).rglob("*")) == sha256s(sources[20].rglob("*"))
    assert fake.artifacts.find(ENTITY, "dylora", "run1-checkpoint:v1").used_by == ["reader-run"]


def test_unknown_alias_lists_available_versions(reader):
    with pytest.raises(CheckpointError) as err:
        store_of().resolve("step-30")
    assert f"{ENTITY}/dylora/run1-checkpoint:step-30 cannot be found" in str(err.value)
    assert "v0 ['step-10']" in str(err.value) and "v1 [" in str(err.value)


@pytest.mark.parametrize("wrong", [{"entity": "other-entity"}, {"project": "other-project"},
                                   {"name": "run2-checkpoint"}])
def test_wrong_entity_project_or_name_is_not_found(reader, wrong):
    store = store_of(**wrong)
    with pytest.raises(CheckpointError) as err:
        store.resolve("latest")
    assert f"{store.entity}/{store.project}/{store.name}:latest cannot be found" in str(err.value)
    assert "available versions of" in str(err.value) and str(err.value).endswith(": none.")


def test_fetch_wandb_references(reader, tmp_path):
    fake, sources = reader
    path = fetch(f"wandb://{ENTITY}/dylora/run1-checkpoint:latest", tmp_path / "cache")
    assert path.name.endswith("-v1") and sha256s(path.rglob("*")) == sha256s(sources[20].rglob("*"))
    # The seed's bare form names the same version; a restart fetching it again reuses the
    # verified copy: no file is downloaded.
    downloads = file_downloads(fake)
    assert fetch(f"{ENTITY}/dylora/run1-checkpoint:v1", tmp_path / "cache", bare_is_wandb=True) == path
    assert file_downloads(fake) == downloads
    # A damaged file fails the fetch, naming it. (Fetched first in this cache on purpose: the W&B
    # cache serves any file it already holds with the right size, damaged or not.)
    version = fake.artifacts.corrupt(ENTITY, "dylora", "run1-checkpoint:v0", "data_state.json")
    try:
        with pytest.raises(CheckpointError, match=rf"Cannot fetch checkpoint 'wandb://{ENTITY}/dylora/"
                                                  r"run1-checkpoint:step-10': .*data_state.json has sha256"):
            fetch(f"wandb://{ENTITY}/dylora/run1-checkpoint:step-10", tmp_path / "other")
    finally:
        version.corrupted.clear()
    assert list((tmp_path / "other").iterdir()) == []


def test_unreachable_wandb_fails_within_one_deadline(tmp_path, monkeypatch):
    """Nothing listens at WANDB_BASE_URL: the real client gives up after ``timeout_s``, which is also the
    fetch's one deadline, so no further attempt of ``timeout_s`` follows (the issue: 3 attempts of it each).
    Which comes first, the client's timeout or the deadline, depends on the machine's load: both end the same
    (a client that fails faster is retried within the deadline: the count of attempts varies too)."""
    for name, value in client_env(f"http://127.0.0.1:{free_port()}", tmp_path, WANDB_SILENT="true").items():
        monkeypatch.setenv(name, value)
    try:
        with pytest.raises(CheckpointError) as err:
            fetch("wandb://team/dylora/run1-checkpoint:latest", tmp_path, retries=2, backoff_s=0.01,
                  timeout_s=1)
    finally:
        wandb.teardown()
    message = str(err.value)
    store = "wandb://team/dylora/run1-checkpoint"
    gave_up = rf"Cannot fetch checkpoint '{store}:latest' after [123] attempt\(s\): Cannot reach W&B for {store}"
    cut = rf"Cannot fetch checkpoint '{store}:latest': store {store} did not answer within 1 s"
    assert re.match(f"{gave_up}|{cut}", message), message
    assert "wandb login" not in message


def test_missing_wandb_login_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    with pytest.raises(CheckpointError, match=r"Cannot reach W&B for wandb://team/dylora/"
                                              r"run1-checkpoint: .*wandb login or WANDB_API_KEY"):
        fetch("wandb://team/dylora/run1-checkpoint:latest", tmp_path, retries=0)


def test_refused_api_key_is_a_login_error_not_retried(tmp_path, monkeypatch):
    with FakeWandb(refuse_keys=True) as fake:
        for name, value in client_env(fake.url, tmp_path, WANDB_SILENT="true").items():
            monkeypatch.setenv(name, value)
        try:
            with pytest.raises(CheckpointError, match=r"Cannot fetch checkpoint 'wandb://team/dylora/run1-"
                                                      r"checkpoint:latest': Cannot reach W&B .*not logged in\. "
                                                      r"Log in \(wandb login"):
                fetch("wandb://team/dylora/run1-checkpoint:latest", tmp_path, retries=2, backoff_s=0.01)
        finally:
            wandb.teardown()
