"""The checkpoint format: manifest, atomic write, verification, retention, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dylora_moe.checkpoint import commit
from dylora_moe.checkpoint.commit import cleanup_partial, write_checkpoint
from dylora_moe.checkpoint.directory import apply_retention, latest_checkpoint, list_checkpoints
from dylora_moe.checkpoint.format import Manifest, checkpoint_name, is_complete, verify_checkpoint
from dylora_moe.errors import CheckpointError
from tests.checkpoint.conftest import payload


def test_checkpoint_name():
    assert checkpoint_name(120) == "step-00000120"


def test_write_verify_round_trip(ckpts):
    parent, make = ckpts
    path = make(7, epoch=1, fingerprint={"num_experts": 4}, data_state={"position": 56})
    assert path == parent / "step-00000007" and is_complete(path)
    manifest = verify_checkpoint(path)
    assert manifest.global_step == 7 and manifest.epoch == 1
    assert manifest.fingerprint == {"num_experts": 4} and manifest.data_state == {"position": 56}
    assert manifest.wandb == {"run_id": "run1", "step": 7}
    assert set(manifest.versions) == {"python", "torch", "transformers", "peft", "dylora_moe"}
    for rel, data in payload(7).items():
        assert manifest.files[rel] == {"sha256": hashlib.sha256(data).hexdigest(),
                                       "size": len(data)}
    assert manifest.total_size == sum(len(d) for d in payload(7).values())
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert [p.name for p in parent.iterdir()] == ["step-00000007"]  # no staging left behind


def test_manifest_rejects_unknown_version_fields_and_bad_paths():
    good = json.loads(Manifest(global_step=1).to_json())
    with pytest.raises(CheckpointError, match="format_version 2; this version of dylora_moe "
                                              "reads format_version 1"):
        Manifest.from_json(json.dumps({**good, "format_version": 2}))
    with pytest.raises(CheckpointError, match=r"unknown fields \['surprise'\]"):
        Manifest.from_json(json.dumps({**good, "surprise": 1}))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Manifest.from_json("{nope", source="x/manifest.json")
    bad = {**good, "files": {"../evil": {"sha256": "0" * 64, "size": 1}}}
    with pytest.raises(CheckpointError, match=r"lists the file '\.\./evil'"):
        Manifest.from_json(json.dumps(bad))


def test_corrupted_byte_is_named_with_both_hashes(ckpts):
    path = ckpts[1](3)
    target = path / "trainable.safetensors"
    data = bytearray(target.read_bytes())
    expected = hashlib.sha256(data).hexdigest()
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path)
    message = str(err.value)
    assert "trainable.safetensors has sha256 " + hashlib.sha256(data).hexdigest() in message
    assert "the manifest expects " + expected in message


def test_truncated_missing_and_stray_files(ckpts):
    path = ckpts[1](3)
    (path / "data_state.json").write_bytes(b"{}")
    (path / "optimizer" / "state.json").unlink()
    (path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path)
    message = str(err.value)
    size = len(payload(3)["data_state.json"])
    assert f"data_state.json has 2 bytes, the manifest expects {size}" in message
    assert "optimizer/state.json is missing" in message
    assert "notes.txt is not listed in the manifest (stray file)" in message


def test_missing_manifest_is_incomplete(ckpts):
    path = ckpts[1](3)
    (path / "manifest.json").unlink()
    assert not is_complete(path)
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        verify_checkpoint(path)


def test_failed_write_leaves_nothing_and_partial_dirs_are_never_complete(ckpts):
    parent, make = ckpts
    make(1)

    def explode(staging: Path) -> None:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(parent, checkpoint_name(2), explode, {"global_step": 2})
    assert sorted(p.name for p in parent.iterdir()) == ["step-00000001"]
    # What a SIGKILL leaves: a staging dir, even with a manifest already in it.
    leftover = parent / ".tmp-step-00000003-abc123"
    leftover.mkdir()
    (leftover / "manifest.json").write_text(Manifest(global_step=3).to_json())
    assert not is_complete(leftover)
    assert [step for step, _ in list_checkpoints(parent)] == [1]
    assert cleanup_partial(parent, min_age_s=3600) == []  # too young: maybe still being written
    assert cleanup_partial(parent) == [leftover] and not leftover.exists()


def test_write_files_may_not_write_the_manifest(tmp_path):
    with pytest.raises(CheckpointError, match="wrote manifest.json itself"):
        write_checkpoint(tmp_path, "step-1", lambda d: (d / "manifest.json").write_text("{}"),
                         {"global_step": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "move-aside"])
def test_existing_checkpoint_is_refused_or_swapped(ckpts, monkeypatch, exchange):
    parent, make = ckpts
    path = make(5)
    with pytest.raises(CheckpointError, match="already exists and is never overwritten"):
        make(5)
    if not exchange:
        monkeypatch.setattr(commit, "_rename_exchange", lambda a, b: False)
    write_checkpoint(parent, path.name, lambda d: (d / "new.bin").write_bytes(b"new"),
                     {"global_step": 5, "epoch": 9}, overwrite=True)
    manifest = verify_checkpoint(path)
    assert manifest.epoch == 9 and list(manifest.files) == ["new.bin"]
    assert [p.name for p in parent.iterdir()] == [path.name]


def test_cleanup_restores_a_checkpoint_moved_aside_by_an_interrupted_overwrite(ckpts):
    parent, make = ckpts
    path = make(5)
    aside = parent / f".old-{path.name}-abc123"
    os.rename(path, aside)  # the crash came between the two renames
    cleanup_partial(parent)
    assert verify_checkpoint(path).global_step == 5 and not aside.exists()


def test_retention_keeps_newest_and_best_and_ignores_partial(ckpts):
    parent, make = ckpts
    for step in (10, 20, 30, 40, 50):
        make(step)
    partial = parent / ".tmp-step-00000060-zzz"
    partial.mkdir()
    deleted = apply_retention(parent, keep_last=2, best_name="step-00000020")
    assert sorted(p.name for p in deleted) == ["step-00000010", "step-00000030"]
    assert [step for step, _ in list_checkpoints(parent)] == [20, 40, 50]
    assert partial.exists() and latest_checkpoint(parent).name == "step-00000050"
    with pytest.raises(CheckpointError, match="keep_last=0 is not allowed"):
        apply_retention(parent, keep_last=0)


CRASH_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dylora_moe.checkpoint.commit import write_checkpoint
    from dylora_moe.checkpoint.stores.local import LocalStore
    parent, store_root, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def hang(what):
        print(what, flush=True)
        time.sleep(60)

    if mode == "write":
        def write_files(staging):
            (staging / "trainable.safetensors").write_bytes(b"half")
            hang("WRITING")
        write_checkpoint(parent, "step-00000002", write_files, {"global_step": 2})
    else:
        store = LocalStore(store_root)
        upload = store._upload
        def slow_upload(local, key):
            upload(local, key)
            hang("UPLOADING")
        store._upload = slow_upload
        store.publish(parent / "step-00000002", 2, ["latest"])
""")


@pytest.mark.parametrize("mode", ["write", "publish"])
def test_sigkill_mid_write_keeps_previous_checkpoint_and_latest(ckpts, tmp_path, mode):
    from dylora_moe.checkpoint.stores.local import LocalStore

    parent, make = ckpts
    store = LocalStore(tmp_path / "store")
    assert store.publish(make(1), 1, ["latest"]) == "v0"
    if mode == "publish":
        make(2)
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(parent), str(store.root),
                             mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() in ("WRITING", "UPLOADING")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    expected_step = 1 if mode == "write" else 2
    assert verify_checkpoint(latest_checkpoint(parent)).global_step == expected_step
    assert verify_checkpoint(parent / "step-00000001").global_step == 1
    assert store.resolve("latest") == "v0"
    assert [v.version for v in store.list_versions()] == ["v0"]
    if mode == "write":
        assert len(cleanup_partial(parent)) == 1
    else:  # the half-uploaded v1 is never reused
        assert (store.root / "v1").is_dir()
        assert store.publish(parent / "step-00000002", 2, ["latest"]) == "v2"
    assert store.resolve("latest") == ("v0" if mode == "write" else "v2")
    assert sorted(p.name for p in parent.iterdir()) == sorted(
        ["step-00000001"] + (["step-00000002"] if mode == "publish" else []))
