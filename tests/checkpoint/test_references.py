"""Reference parsing, fetch of every form, and ``auto``."""

from __future__ import annotations

import shutil
import uuid

import pytest

from dylora_moe.checkpoint.format import verify_checkpoint
from dylora_moe.checkpoint.references import Reference, fetch, find_auto, parse_reference
from dylora_moe.checkpoint.stores import FsspecStore, LocalStore
from dylora_moe.errors import CheckpointError
from tests.conftest import free_port


@pytest.mark.parametrize("ref, bare, expected", [
    ("auto", False, ("auto", "", None)),
    ("latest", False, ("latest", "", None)),
    ("runs/run1", False, ("path", "runs/run1", None)),
    ("/abs/run1/checkpoints/step-00000010", False,
     ("path", "/abs/run1/checkpoints/step-00000010", None)),
    ("wandb://team/proj/run1-checkpoint:best", False,
     ("wandb", "wandb://team/proj/run1-checkpoint", "best")),
    ("wandb://team/proj/run1-checkpoint", False,
     ("wandb", "wandb://team/proj/run1-checkpoint", "latest")),
    ("team/proj/best-dylora-model-full:v3", True,
     ("wandb", "wandb://team/proj/best-dylora-model-full", "v3")),
    ("team/proj/best-dylora-model-full:v3", False,  # the seed's bare form, wherever no such directory exists
     ("wandb", "wandb://team/proj/best-dylora-model-full", "v3")),
    ("/no/such/run/store:latest", False, ("store", "/no/such/run/store", "latest")),
    ("gcs://bucket/run1/store:v1", False, ("url", "gcs://bucket/run1/store", "v1")),
    ("s3://bucket/run1/store:latest", False, ("url", "s3://bucket/run1/store", "latest")),
    ("gs://bucket/run1/store:step-120", False, ("url", "gs://bucket/run1/store", "step-120")),
    ("s3://bucket:v2", False, ("url", "s3://bucket", "v2")),
    ("file:///runs/run1/store:v3", False, ("url", "file:///runs/run1/store", "v3")),
    ("memory://b/run1/store/v0/", False, ("url", "memory://b/run1/store/v0", None)),
    ("gs://bucket/run1/store/v4", False, ("url", "gs://bucket/run1/store/v4", None)),
])
def test_parse_every_form(ref, bare, expected):
    assert parse_reference(ref, bare_is_wandb=bare) == Reference(ref, *expected)


@pytest.mark.parametrize("ref, bare, message", [
    ("", False, "'' is malformed: it is empty"),
    ("wandb://team/proj", False, "names ENTITY/PROJECT/NAME \\(three parts\\)"),
    ("wandb://team/proj/name:bad alias", False, "'bad alias' is not a version"),
    ("ftp://host/ckpt", False, "the scheme ftp:// is not supported"),
    ("s3://", False, "the URL has no bucket or path"),
    ("s3://bucket/store:", False, "'' is not a version"),
    ("team/proj", True, "expects ENTITY/PROJECT/NAME:vN or ENTITY/PROJECT/NAME:latest"),
    ("team/proj/name", True, "expects ENTITY/PROJECT/NAME:vN"),
    ("x:", False, "'' is not a version"),
    (":latest", False, "nothing before ':latest' names a store"),
    ("runs/run1/store:", False, "'' is not a version"),
])
def test_malformed_references(ref, bare, message):
    with pytest.raises(CheckpointError, match=message) as err:
        parse_reference(ref, bare_is_wandb=bare)
    assert "accepted forms: auto, latest, a local directory" in str(err.value)


def test_fetch_local_forms(ckpts, tmp_path):
    parent, make = ckpts
    make(10)
    newest = make(20)
    run_dir = parent.parent
    assert fetch(str(parent / "step-00000010"), tmp_path / "dl").name == "step-00000010"
    assert fetch(str(run_dir), tmp_path / "dl") == newest
    assert fetch(str(parent), tmp_path / "dl") == newest
    assert fetch("latest", tmp_path / "dl", run_dir=run_dir) == newest
    assert not (tmp_path / "dl").exists()  # local checkpoints are verified in place


def test_a_local_directory_before_alias_is_a_store_and_wins_over_the_bare_wandb_form(ckpts, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "team" / "proj" / "store")
    store.publish(ckpts[1](10), 10)
    monkeypatch.chdir(tmp_path)
    assert parse_reference("team/proj/store:latest") == Reference("team/proj/store:latest", "store",
                                                                  "team/proj/store", "latest")
    assert verify_checkpoint(fetch("team/proj/store:latest", tmp_path / "dl")).global_step == 10
    # --wandb_checkpoint_artifact says W&B, whatever exists locally
    assert parse_reference("team/proj/store:latest", bare_is_wandb=True).kind == "wandb"


def test_fetch_local_errors(ckpts, tmp_path):
    parent, make = ckpts
    (make(10) / "data_state.json").write_bytes(b"{}")
    with pytest.raises(CheckpointError, match=r"Cannot fetch checkpoint '.*run': .*"
                                              r"data_state.json has 2 bytes"):
        fetch(str(parent.parent), tmp_path / "dl")
    with pytest.raises(CheckpointError, match="'latest' needs a run directory"):
        fetch("latest", tmp_path / "dl")
    with pytest.raises(CheckpointError, match=r"the local directory .*nowhere does not exist\."):
        fetch(str(tmp_path / "nowhere"), tmp_path / "dl")
    with pytest.raises(CheckpointError, match=r"the local store directory .*nowhere/store does not exist\."):
        fetch(f"{tmp_path}/nowhere/store:latest", tmp_path / "dl")
    with pytest.raises(CheckpointError, match="is neither a complete checkpoint nor"):
        fetch(str(tmp_path), tmp_path / "dl")
    with pytest.raises(CheckpointError, match="'auto' is resolved by the caller"):
        fetch("auto", tmp_path / "dl")


def test_find_auto_ignores_checkpoints_without_manifest(ckpts, tmp_path):
    parent, make = ckpts
    run_dir = parent.parent
    assert find_auto(run_dir, None) is None
    make(10)
    uncommitted = make(20)
    (uncommitted / "manifest.json").unlink()  # killed before the commit record was written
    partial = parent / ".tmp-step-00000030-abc"
    shutil.copytree(parent / "step-00000010", partial)
    assert find_auto(run_dir, None) == str(parent / "step-00000010")


def test_find_auto_falls_back_to_the_store_and_skips_incomplete_versions(ckpts, tmp_path):
    parent, make = ckpts
    store = LocalStore(tmp_path / "store")
    store.publish(make(10), 10)
    store.publish(make(20), 20)
    shutil.copytree(store.root / "v1", store.root / "v2")  # an upload killed before its manifest
    (store.root / "v2" / "manifest.json").unlink()
    fresh_vm = tmp_path / "fresh-run"
    ref = find_auto(fresh_vm, store)
    assert ref == store.url + ":v1"
    path = fetch(ref, tmp_path / "downloads")
    assert verify_checkpoint(path).global_step == 20 and path.parent == tmp_path / "downloads"
    assert fetch(ref, tmp_path / "downloads") == path  # a restart reuses the verified copy
    assert find_auto(fresh_vm, LocalStore(tmp_path / "empty-store")) is None


def test_fetch_store_alias_and_folder_urls(ckpts, tmp_path):
    url = f"memory://refs-{uuid.uuid4().hex}/run1/store"
    store = FsspecStore(url)
    store.publish(ckpts[1](10), 10, ["latest", "best"])
    store.publish(ckpts[1](20), 20)
    assert verify_checkpoint(fetch(f"{url}:best", tmp_path / "dl")).global_step == 10
    assert verify_checkpoint(fetch(f"{url}/v1", tmp_path / "dl")).global_step == 20
    with pytest.raises(CheckpointError, match=r"Cannot fetch checkpoint '.*:step-30': .*"
                                              r"available versions: \['v0', 'v1'\]"):
        fetch(f"{url}:step-30", tmp_path / "dl")
    with pytest.raises(CheckpointError, match=r"store has no manifest.json: it is not a "
                                              r"complete checkpoint"):
        fetch(url, tmp_path / "dl")


def test_fetch_unreachable_store_names_reference_and_cause(tmp_path, monkeypatch, without_gcsfs):
    pytest.importorskip("s3fs")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    dead = f"http://127.0.0.1:{free_port()}"
    options = {"client_kwargs": {"endpoint_url": dead},
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(CheckpointError) as err:
        fetch("s3://ckpt/run1/store:latest", tmp_path / "dl", storage_options=options,
              timeout_s=10, retries=1, backoff_s=0.01)  # one deadline for both attempts: room for two refusals
    message = str(err.value)
    assert message.startswith("Cannot fetch checkpoint 's3://ckpt/run1/store:latest' after 2 "
                              "attempt(s): Store s3://ckpt/run1/store failed while resolving")
    assert "Could not connect to the endpoint URL" in message
    with pytest.raises(CheckpointError, match="needs the package gcsfs"):
        fetch("gs://bucket/run1/store:latest", tmp_path / "dl")
