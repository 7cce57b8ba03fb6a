"""The W&B store: publishing with the real client offline; verified downloads at the SDK edge."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import pytest

from dylora_moe.checkpoint.references import fetch
from dylora_moe.checkpoint.stores.wandb_store import FINAL_BEST_NAME, WandbStore
from dylora_moe.errors import CheckpointError

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


def test_offline_publish_final_best(offline_run, ckpts, tmp_path):
    store = WandbStore.for_run(offline_run)
    model_dir = tmp_path / "exported"
    model_dir.mkdir()
    (model_dir / "adapter_model.safetensors").write_bytes(b"weights")
    assert store.publish_final_best(ckpts[1](10), 10, model_dir=model_dir) == "step-10"
    assert FINAL_BEST_NAME.encode() in finish(offline_run)


def test_publish_needs_a_run(ckpts):
    with pytest.raises(CheckpointError, match="needs an active W&B run"):
        WandbStore("team", "dylora", "run1-checkpoint").publish(ckpts[1](10), 10)


class FakeArtifact:
    """A FAKE standing in for the object ``wandb.Api().artifact(...)`` returns.

    It has the attributes our store reads (version, aliases, size, metadata, created_at) and a
    ``download(root)`` that writes the files it was given, optionally with one byte flipped in
    ``corrupt`` — as the real client may do, since it does not verify downloads.
    """

    def __init__(self, source: Path, version: str, aliases: list[str], step: int,
                 corrupt: str | None = None):
        self.source, self.version, self.aliases, self.corrupt = source, version, aliases, corrupt
        manifest_sha256 = hashlib.sha256((source / "manifest.json").read_bytes()).hexdigest()
        self.metadata = {"step": step, "manifest_sha256": manifest_sha256}  # as publish writes
        self.created_at = "2026-01-01T00:00:00"
        self.size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
        self.download_calls: list[dict] = []

    def download(self, root: str, **kwargs) -> str:
        self.download_calls.append(kwargs)
        assert not kwargs.get("skip_cache"), "skip_cache=True must never be used"
        for path in self.source.rglob("*"):
            if path.is_file():
                rel = path.relative_to(self.source).as_posix()
                data = bytearray(path.read_bytes())
                if rel == self.corrupt:
                    data[0] ^= 0xFF
                (Path(root) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(root) / rel).write_bytes(bytes(data))
        return root


class FakeApi:
    """A FAKE ``wandb.Api``: ``artifact("E/P/NAME:ALIAS")`` and ``artifacts(type, name)``."""

    def __init__(self, artifacts: list[FakeArtifact]):
        self.items = artifacts

    def artifact(self, name: str, type: str | None = None) -> FakeArtifact:
        ref = name.rsplit(":", 1)[1]
        for item in self.items:
            if ref == item.version or ref in item.aliases:
                return item
        raise wandb.errors.CommError(f"artifact '{name}' not found")

    def artifacts(self, type_name: str, name: str) -> list[FakeArtifact]:
        return list(self.items)


@pytest.fixture
def fake_api(ckpts):
    return FakeApi([FakeArtifact(ckpts[1](10), "v0", ["step-10"], 10),
                    FakeArtifact(ckpts[1](20), "v1", ["latest", "best", "step-20"], 20)])


def test_download_is_verified_and_uses_the_cache(fake_api, tmp_path):
    store = WandbStore("team", "dylora", "run1-checkpoint", api=fake_api)
    assert store.resolve("best") == "v1"
    dest = store.download("best", tmp_path / "dl")
    assert (dest / "manifest.json").is_file()
    assert fake_api.items[1].download_calls == [{}]
    assert [(v.version, v.step) for v in store.list_versions()] == [("v0", 10), ("v1", 20)]


def test_corrupted_download_is_caught_naming_the_file(fake_api, tmp_path):
    fake_api.items[1].corrupt = "trainable.safetensors"
    store = WandbStore("team", "dylora", "run1-checkpoint", api=fake_api)
    with pytest.raises(CheckpointError) as err:
        store.download("latest", tmp_path / "dl")
    message = str(err.value)
    assert "trainable.safetensors has sha256" in message and "W&B cache" in message
    assert not (tmp_path / "dl").exists()


def test_unknown_alias_lists_available_versions(fake_api):
    store = WandbStore("team", "dylora", "run1-checkpoint", api=fake_api)
    with pytest.raises(CheckpointError) as err:
        store.resolve("step-30")
    assert "team/dylora/run1-checkpoint:step-30 cannot be found" in str(err.value)
    assert "v1 ['latest', 'best', 'step-20']" in str(err.value)


def test_fetch_wandb_references(fake_api, tmp_path):
    path = fetch("wandb://team/dylora/run1-checkpoint:step-10", tmp_path / "cache",
                 wandb_api=fake_api)
    assert path.name.endswith("-v0") and (path / "manifest.json").is_file()
    bare = fetch("team/dylora/run1-checkpoint:v1", tmp_path / "cache", bare_is_wandb=True,
                 wandb_api=fake_api)
    assert bare.name.endswith("-v1")
    # A restart fetching the same version again reuses the verified copy.
    assert fetch("wandb://team/dylora/run1-checkpoint:best", tmp_path / "cache",
                 wandb_api=fake_api) == bare
    assert len(fake_api.items[1].download_calls) == 1
    fake_api.items[0].corrupt = "data_state.json"
    with pytest.raises(CheckpointError, match=r"Cannot fetch checkpoint 'wandb://team/dylora/"
                                              r"run1-checkpoint:v0': .*data_state.json has sha256"):
        fetch("wandb://team/dylora/run1-checkpoint:v0", tmp_path / "other", wandb_api=fake_api)


class UnreachableApi:
    """A FAKE ``wandb.Api`` whose every call fails as a dropped network would."""

    def __init__(self):
        self.calls = 0

    def artifact(self, name, type=None):
        self.calls += 1
        raise ConnectionError("Max retries exceeded with url: /graphql")

    def artifacts(self, type_name, name):
        raise ConnectionError("Max retries exceeded with url: /graphql")


def test_unreachable_wandb_is_retried_then_reported(tmp_path):
    api = UnreachableApi()
    with pytest.raises(CheckpointError) as err:
        fetch("wandb://team/dylora/run1-checkpoint:latest", tmp_path, wandb_api=api,
              retries=1, backoff_s=0.01)
    assert api.calls == 2
    assert str(err.value).startswith("Cannot fetch checkpoint 'wandb://team/dylora/"
                                     "run1-checkpoint:latest' after 2 attempt(s)")
    assert "Max retries exceeded" in str(err.value)


def test_missing_wandb_login_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    with pytest.raises(CheckpointError, match=r"Cannot reach W&B for wandb://team/dylora/"
                                              r"run1-checkpoint: .*wandb login or WANDB_API_KEY"):
        fetch("wandb://team/dylora/run1-checkpoint:latest", tmp_path, retries=0)
