"""`dylora train` at its edges, as a user meets them: a subprocess per case, asserting the exit status,
the message, no traceback, and that earlier checkpoints are intact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dylora_moe.checkpoint.directory import list_checkpoints
from dylora_moe.checkpoint.format import verify_checkpoint
from dylora_moe.cli import main
from tests.conftest import REPO_ROOT, SHARED_DATASETS

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "WANDB_MODE": "offline"}
FAST = ["--report_to", "none", "--progress", "false", "--max_seq_length", "64", "--training_subset", "5",
        "--eval_subset", "20", "--train_batch_size", "4", "--eval_steps", "0", "--logging_steps", "1"]


def train_argv(model_dir, out, run_id, *extra):
    return [sys.executable, "-m", "dylora_moe.cli", "train", "--model_name", str(model_dir), "--output_dir",
            str(out), "--run_id", run_id, *FAST, *extra]


def run(argv, timeout=300, **kwargs):
    return subprocess.run(argv, cwd=REPO_ROOT, env=kwargs.pop("env", ENV), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def assert_clean_failure(done, status, *phrases):
    err = done.stderr
    assert done.returncode == status, err
    assert "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in " ".join(err.split()), (phrase, err)


def intact_checkpoints(run_dir: Path) -> list[int]:
    found = list_checkpoints(run_dir / "checkpoints")
    for _, path in found:
        verify_checkpoint(path)
    return [step for step, _ in found]


@pytest.fixture(scope="module")
def other_weights_dir(small_model_dir, tmp_path_factory):
    """The same architecture and config as small_model_dir, other weights (another seed)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(small_model_dir)
    torch.manual_seed(1)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    path = tmp_path_factory.mktemp("other-weights")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(small_model_dir).save_pretrained(path)
    return path


@pytest.mark.slow
def test_resume_onto_other_base_weights_exits_2_and_a_copy_of_the_same_weights_resumes(
        small_model_dir, other_weights_dir, tmp_path):
    first = run(train_argv(small_model_dir, tmp_path, "a", "--max_steps", "2"))
    assert first.returncode == 0, first.stderr

    other = run(train_argv(other_weights_dir, tmp_path, "a", "--max_steps", "3", "--resume", "auto"))
    assert_clean_failure(other, 2, "does not fit the requested model", "base_weights_sha",
                         "The base model's weights differ")
    assert intact_checkpoints(tmp_path / "a") == [2]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["steps"] == 2  # untouched

    copy = tmp_path / "copy-of-base"  # as a hub id and its local snapshot: other name, same weights
    shutil.copytree(small_model_dir, copy)
    same = run(train_argv(copy, tmp_path, "a", "--max_steps", "3", "--resume", "auto"))
    assert same.returncode == 0, same.stderr
    assert "at step 2" in same.stderr and json.loads((tmp_path / "a" / "summary.json").read_text())["steps"] == 3


def _wait_for(predicate, proc, what, timeout=240):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the first run ended before {what}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_on_the_same_run_dir_is_refused_and_kill_9_leaves_no_stale_lock(small_model_dir, tmp_path):
    holder = subprocess.Popen(train_argv(small_model_dir, tmp_path, "shared", "--num_epochs", "50",
                                         "--save_steps", "1"),
                              cwd=REPO_ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        first_step = tmp_path / "shared" / "checkpoints" / "step-00000001"
        _wait_for(first_step.exists, holder, "its first checkpoint")
        second = run(train_argv(small_model_dir, tmp_path, "shared", "--max_steps", "2"))
        assert_clean_failure(second, 1, f"pid {holder.pid} on host {socket.gethostname()}", "is in use by another run")
        assert holder.poll() is None  # the first run goes on
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    steps = intact_checkpoints(tmp_path / "shared")
    restarted = run(train_argv(small_model_dir, tmp_path, "shared", "--max_steps", str(max(steps) + 1),
                               "--resume", "auto"))
    assert restarted.returncode == 0, restarted.stderr  # the dead holder's lock is gone with it
    assert f"at step {max(steps)}" in restarted.stderr


@pytest.mark.slow
def test_weighted_datasets_from_the_readme_train(small_model_dir, tmp_path):
    done = run(train_argv(small_model_dir, tmp_path, "mix", "--max_steps", "1", "--datasets",
                          "code_alpaca:2,evol_instruct:1", "--data_dir", str(SHARED_DATASETS)))
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "mix" / "summary.json").read_text())["data"]
    assert data["mixing"] == "code_alpaca:2,evol_instruct:1"
    in_mix = {name: counts["in_mix"] for name, counts in data["datasets"].items()}
    assert set(in_mix) == {"code_alpaca", "evol_instruct"}
    assert abs(in_mix["code_alpaca"] - 2 * in_mix["evol_instruct"]) <= 2  # the 2:1 weights were applied


@pytest.mark.slow
def test_a_checkpoint_never_confirmed_by_the_store_is_published_after_the_restart(small_model_dir, tmp_path):
    first = run(train_argv(small_model_dir, tmp_path, "p", "--max_steps", "4", "--save_steps", "2",
                           "--save_total_limit", "1"))
    assert first.returncode == 0, first.stderr
    run_dir, store = tmp_path / "p", tmp_path / "p" / "store"
    # As if the process died while uploading step 4: the version has no manifest, latest still says step 2,
    # and a staging folder of an interrupted checkpoint write is left behind.
    for version in store.glob("v*"):  # step 4 (published once: its evaluation comes before its save)
        if json.loads((version / "manifest.json").read_text())["global_step"] == 4:
            (version / "manifest.json").unlink()
    (store / "aliases" / "step-4.json").unlink()
    latest = json.loads((store / "aliases" / "latest.json").read_text())
    (store / "aliases" / "latest.json").write_text(json.dumps({**latest, "version": "v0", "step": 2}))
    leftover = run_dir / "checkpoints" / ".tmp-step-00000006-0123456789ab"
    leftover.mkdir()
    (leftover / "optimizer.pt").write_bytes(b"half written")

    again = run(train_argv(small_model_dir, tmp_path, "p", "--max_steps", "6", "--save_steps", "2",
                           "--save_total_limit", "1", "--resume", "auto"))
    assert again.returncode == 0, again.stderr
    assert "was never confirmed" in again.stderr and "step-00000004" in again.stderr
    assert not leftover.exists()
    versions = sorted(p.name for p in store.iterdir() if p.name.startswith("v"))
    complete = {v: json.loads((store / v / "manifest.json").read_text())["global_step"]
                for v in versions if (store / v / "manifest.json").is_file()}
    steps = sorted(complete.values())  # every step once
    assert steps == [2, 4, 6]  # step 4 published again, as one new version; no step twice
    assert len(versions) == len(complete) + 1  # the unfinished version is never reused nor listed
    assert json.loads((store / "aliases" / "latest.json").read_text())["step"] == 6
    assert intact_checkpoints(run_dir) == [6]  # retention removed step 4 only after the store confirmed it


def test_retention_keeps_checkpoints_from_before_a_restart_until_the_store_confirms_them(small_model_dir, tmp_path):
    """In process, with a store that holds back the re-published checkpoint: it must survive retention."""
    from dylora_moe.checkpoint.stores import LocalStore
    from dylora_moe.errors import UnpublishedCheckpoints
    from dylora_moe.train.config import TrainConfig
    from dylora_moe.train.trainer import Trainer

    def config(**kw):
        return TrainConfig(model_name=small_model_dir, output_dir=str(tmp_path), run_id="keep", report_to="none",
                           progress=False, max_seq_length=64, training_subset=5, eval_subset=20, train_batch_size=4,
                           eval_steps=0, save_steps=2, save_total_limit=1, **kw)

    Trainer(config(max_steps=2)).setup().train()
    shutil.rmtree(tmp_path / "keep" / "store")  # step 2 exists only locally now

    release = threading.Event()

    class HeldBackStore(LocalStore):
        def publish(self, local_dir, step, aliases=("latest",)):
            if step == 2:
                release.wait(30)
                raise OSError("the store is down for step 2")
            return super().publish(local_dir, step, aliases)

    store = HeldBackStore(tmp_path / "keep" / "store")
    trainer = Trainer(config(max_steps=6, resume="auto", publish_timeout_s=1), store=store).setup()
    assert {p.name for p in trainer.checkpointer.unpublished()} == {"step-00000002"}
    try:
        with pytest.raises(UnpublishedCheckpoints, match="not published to .* step-00000002"):
            trainer.train()
    finally:
        release.set()
    # Step 2 survived retention (limit 1) although newer checkpoints came; step 4 too, queued behind it.
    assert [step for step, _ in list_checkpoints(tmp_path / "keep" / "checkpoints")] == [2, 4, 6]


class SilentServer:
    """A TCP endpoint that accepts connections and never answers: the worst kind of store endpoint."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.slow
def test_an_unusable_store_fails_before_training(small_model_dir, tmp_path, s3_endpoint):
    silent = SilentServer()
    try:
        env = {**ENV, "AWS_ENDPOINT_URL": silent.url, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
        done = run(train_argv(small_model_dir, tmp_path, "silent", "--checkpoint_store", "s3://ckpt/silent",
                              "--store_timeout_s", "5", "--max_steps", "1"), env=env)
    finally:
        silent.close()
    assert_clean_failure(done, 1, "checkpoint store s3://ckpt/silent", "did not answer within 5 s",
                         "Nothing was trained")
    assert not (tmp_path / "silent" / "checkpoints").exists()

    # Missing credentials: a permanent error, not retried.
    no_credentials = {k: v for k, v in ENV.items() if not k.startswith("AWS_")}
    no_credentials.update({"AWS_ENDPOINT_URL": s3_endpoint, "AWS_CONFIG_FILE": "/nonexistent",
                           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"})
    done = run(train_argv(small_model_dir, tmp_path, "nocreds", "--checkpoint_store", "s3://ckpt/nocreds",
                          "--max_steps", "1"), env=no_credentials)
    assert_clean_failure(done, 1, "checkpoint store s3://ckpt/nocreds cannot be used", "credentials")
    assert "attempt 2" not in done.stderr

    # No such bucket, with valid credentials.
    creds = {**ENV, "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}
    done = run(train_argv(small_model_dir, tmp_path, "nobucket", "--checkpoint_store", "s3://no-such-bucket/x",
                          "--max_steps", "1"), env=creds)
    assert_clean_failure(done, 1, "checkpoint store s3://no-such-bucket/x cannot be used")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_exits_75_with_what_was_saved(small_model_dir, tmp_path, sig):
    proc = subprocess.Popen(train_argv(small_model_dir, tmp_path, "early", "--max_steps", "2"), cwd=REPO_ROOT,
                            env=ENV, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "early" / ".lock"
    _wait_for(lambda: lock.exists() and str(proc.pid) in lock.read_text(), proc, "the run to start")
    proc.send_signal(sig)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 75, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    flat = " ".join(err.split())
    assert f"stopped by {sig.name} during start-up" in flat
    assert "nothing new was saved and run early has no local checkpoint yet" in flat
    assert not (tmp_path / "early" / "checkpoints").exists() or not list_checkpoints(tmp_path / "early" / "checkpoints")
    assert "--resume auto --run_id early" in flat


@pytest.mark.slow
def test_a_signal_while_the_command_is_still_importing_exits_75(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "dylora_moe.cli", "train", "--output_dir", str(tmp_path)],
                            cwd=REPO_ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # somewhere in start-up; whatever it is doing, the outcome must be the same
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 75, err
    assert "Traceback" not in err and "stopped by SIGTERM during start-up" in " ".join(err.split())


@contextmanager
def tmpfs(path: Path, *options: str):
    """A small file system mounted for the test (needs root, as in CI); skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_read_only_output_dir_is_one_paragraph(small_model_dir, tmp_path):
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as out:
        done = run(train_argv(small_model_dir, out, "r", "--max_steps", "1"))
    assert_clean_failure(done, 2, f"cannot write to --output_dir '{out}'", "Read-only file system",
                         "Give a writable directory with --output_dir")


@pytest.mark.slow
def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(small_model_dir, tmp_path):
    with tmpfs(tmp_path / "small-disk", "size=32m") as out:
        first = run(train_argv(small_model_dir, out, "d", "--max_steps", "2", "--save_steps", "2",
                               "--checkpoint_store", str(tmp_path / "store")))
        assert first.returncode == 0, first.stderr
        with open(out / "filler", "wb", buffering=0) as filler:  # fill the disk to the last byte
            for chunk in (1 << 20, 4096, 1):
                try:
                    while True:
                        filler.write(b"\0" * chunk)
                except OSError:
                    pass
        done = run(train_argv(small_model_dir, out, "d", "--max_steps", "4", "--save_steps", "2", "--resume", "auto",
                              "--checkpoint_store", str(tmp_path / "store")))
        assert_clean_failure(done, 1, "the disk is full", "Nothing partial was kept",
                             "the previous checkpoint", "step-00000002 is intact", "--resume auto --run_id d")
        assert intact_checkpoints(out / "d") == [2]
        assert not [p for p in (out / "d" / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
        (out / "filler").unlink()
        resumed = run(train_argv(small_model_dir, out, "d", "--max_steps", "4", "--save_steps", "2", "--resume", "auto",
                                 "--checkpoint_store", str(tmp_path / "store")))
        assert resumed.returncode == 0, resumed.stderr
        assert intact_checkpoints(out / "d")[-1] == 4


@pytest.mark.slow
def test_an_optimizer_file_that_needs_code_execution_is_refused(small_model_dir, tmp_path):
    from dylora_moe.checkpoint.format import hash_file

    first = run(train_argv(small_model_dir, tmp_path, "o", "--max_steps", "2", "--save_steps", "2"))
    assert first.returncode == 0, first.stderr
    ckpt = tmp_path / "o" / "checkpoints" / "step-00000002"
    marker = tmp_path / "code-ran"
    # A pickle that would run code when loaded without weights_only; its manifest entry is updated to match.
    torch.save({"state": ExecutesOnLoad(str(marker))}, ckpt / "optimizer.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    digest, size = hash_file(ckpt / "optimizer.pt")
    manifest["files"]["optimizer.pt"] = {"sha256": digest, "size": size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))

    done = run(train_argv(small_model_dir, tmp_path, "o2", "--max_steps", "3", "--resume", str(ckpt)))
    assert_clean_failure(done, 1, "optimizer.pt of checkpoint", "can only be loaded by executing code",
                         "nothing in it ran")
    assert "weights_only" not in done.stderr
    assert not marker.exists()
    assert not (tmp_path / "o2" / "checkpoints").exists()


class ExecutesOnLoad:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_run_id_that_would_leave_the_output_dir_is_refused_up_front(tmp_path, capsys):
    done = run([sys.executable, "-m", "dylora_moe.cli", "train", "--output_dir", str(tmp_path / "out"),
                "--run_id", "../escape"], timeout=120)
    assert_clean_failure(done, 2, "--run_id '../escape' is not a valid run id")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()
    for run_id in ("a/b", "..", ".hidden", "x" * 129):  # the same rule, in process (a subprocess costs seconds)
        assert main(["train", "--output_dir", str(tmp_path / "out"), "--run_id", run_id]) == 2
        assert f"--run_id {run_id!r} is not a valid run id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_bad_run_id_from_the_platform_is_refused_naming_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLOUD_ML_JOB_ID", "../../etc")
    assert main(["train", "--output_dir", str(tmp_path)]) == 2
    assert "CLOUD_ML_JOB_ID '../../etc' is not a valid run id" in capsys.readouterr().err


def test_a_missing_model_directory_says_no_such_directory(tmp_path):
    done = run([sys.executable, "-m", "dylora_moe.cli", "train", "--output_dir", str(tmp_path),
                "--model_name", "/nonexistent/path"], timeout=120)
    assert_clean_failure(done, 2, "--model_name '/nonexistent/path': no such directory")
    assert "malformed" not in done.stderr.lower()


def test_a_malformed_checkpoint_reference_is_bad_input(tmp_path, capsys):
    done = run([sys.executable, "-m", "dylora_moe.cli", "train", "--output_dir", str(tmp_path), "--resume", "s3://"],
               timeout=120)
    assert_clean_failure(done, 2, "Checkpoint reference 's3://' is malformed")
    for flag, ref in [("--resume", "wandb://only/two"), ("--wandb_checkpoint_artifact", "entity/project"),
                      ("--start_from", "gs://bucket/x:not an alias")]:
        assert main(["train", "--output_dir", str(tmp_path), flag, ref]) == 2
        assert f"Checkpoint reference {ref!r} is malformed" in " ".join(capsys.readouterr().err.split())
    assert main(["ckpt", "show", "wandb://only/two"]) == 2  # the same syntax, the same status everywhere
    assert not any(tmp_path.iterdir())  # refused before a run directory exists
