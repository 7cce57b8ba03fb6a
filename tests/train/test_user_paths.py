"""What users run, as they run it: `dylora train` processes against an S3 store (a moto server on
loopback), stopped with Ctrl-C while the store hangs, and configured the README's ways (a YAML
file, --bf16 on CPU, the run id a platform sets, early stopping)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from dylora_moe.checkpoint.directory import latest_checkpoint
from dylora_moe.checkpoint.format import read_manifest, verify_checkpoint
from dylora_moe.checkpoint.stores import FsspecStore
from dylora_moe.cli import main
from dylora_moe.train.config import TrainConfig
from tests.conftest import REPO_ROOT

TINY = ["--report_to", "none", "--progress", "false", "--training_subset", "2", "--eval_subset", "20",
        "--max_seq_length", "64", "--train_batch_size", "4", "--eval_steps", "0"]


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CLOUD_ML_JOB_ID", "SKYPILOT_TASK_ID")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def train_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "dylora_moe.cli", "train", *args]


def s3_store(url: str, endpoint: str) -> FsspecStore:
    return FsspecStore(url, storage_options={"client_kwargs": {"endpoint_url": endpoint}})


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path, limit_s: float = 240) -> None:
    """Poll a file-system or store condition while the run is alive (the limit only guards a hang)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}: {log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_training_with_an_s3_checkpoint_store_end_to_end(small_model_dir, s3_endpoint, tmp_path, monkeypatch,
                                                         caplog):
    url = f"s3://ckpt/{uuid.uuid4().hex}/run1/store"
    done = subprocess.run(
        train_argv("--model_name", small_model_dir, "--output_dir", str(tmp_path), "--run_id", "s3run",
                   "--checkpoint_store", url, "--save_steps", "1", "--max_steps", "2", *TINY),
        cwd=REPO_ROOT, env=env_with(AWS_ENDPOINT_URL=s3_endpoint), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "s3run" / "store").exists()  # nothing went to the default local store

    store = s3_store(url, s3_endpoint)
    versions = store.list_versions()
    assert [v.step for v in versions][:2] == [1, 2]
    latest = store.resolve("latest")
    assert [v.step for v in versions if v.version == latest] == [2]
    downloaded = store.download("latest", tmp_path / "downloaded")
    local = tmp_path / "s3run" / "checkpoints" / "step-00000002"
    assert read_manifest(downloaded).files == verify_checkpoint(local).files  # the same bytes, every file

    # Another machine resumes from the store by URL and continues at step 2.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    caplog.set_level("INFO")
    assert main(["train", "--model_name", small_model_dir, "--output_dir", str(tmp_path / "elsewhere"),
                 "--run_id", "s3run", "--resume", f"{url}:latest", "--max_steps", "3", *TINY]) == 0
    assert "at step 2" in caplog.text
    summary = json.loads((tmp_path / "elsewhere" / "s3run" / "summary.json").read_text())
    assert summary["steps"] == 3


class StallingProxy:
    """A loopback TCP proxy in front of the S3 server. Once ``stall`` is set it forwards nothing
    more, in either direction: requests hang as on a network that stopped answering."""

    def __init__(self, target: str):
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        self.stall = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.stall.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for s in self.sockets:
            s.close()


@pytest.mark.slow
def test_ctrl_c_while_the_store_hangs_keeps_the_checkpoint_and_says_it_was_not_published(
        small_model_dir, s3_endpoint, tmp_path):
    proxy = StallingProxy(s3_endpoint)
    url = f"s3://ckpt/{uuid.uuid4().hex}/run1/store"
    store = s3_store(url, s3_endpoint)  # read directly, not through the proxy
    argv = train_argv("--model_name", small_model_dir, "--output_dir", str(tmp_path), "--run_id", "stall",
                      "--checkpoint_store", url, "--save_steps", "1", "--num_epochs", "100",
                      "--preemption_budget_s", "2", *TINY)
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env_with(AWS_ENDPOINT_URL=proxy.url), stderr=stderr,
                                text=True)
    try:
        wait_for(lambda: any(v.step for v in store.list_versions()), "a first version in the store", proc, log)
        proxy.stall.set()
        published = {v.step for v in store.list_versions()}
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proxy.close()
    err = log.read_text()
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "stopped by SIGINT" in err
    assert "publishing did not finish in the budget" in err
    newest = latest_checkpoint(tmp_path / "stall" / "checkpoints")
    step = verify_checkpoint(newest).global_step  # intact: every checksum holds
    assert f"at step {step}" in err and str(newest) in err
    assert step not in published and max(v.step for v in store.list_versions()) < step


def test_run_id_comes_from_the_platform(monkeypatch):
    """--run_id, else Vertex AI's CLOUD_ML_JOB_ID, else SkyPilot's SKYPILOT_TASK_ID."""
    monkeypatch.delenv("CLOUD_ML_JOB_ID", raising=False)
    monkeypatch.setenv("SKYPILOT_TASK_ID", "sky-task-7")
    assert TrainConfig().resolved_run_id() == "sky-task-7"
    monkeypatch.setenv("CLOUD_ML_JOB_ID", "vertex-job-42")
    assert TrainConfig().resolved_run_id() == "vertex-job-42"
    assert TrainConfig(run_id="mine").resolved_run_id() == "mine"


@pytest.mark.slow
def test_readme_config_file_bf16_on_cpu_platform_run_id_and_early_stopping(small_model_dir, tmp_path):
    """`dylora train --config run.yaml --bf16` on a CPU, as a Vertex AI job (CLOUD_ML_JOB_ID names the
    run), with a learning rate so high that the held-out loss stops improving: early stopping ends it."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_name": small_model_dir, "output_dir": str(tmp_path / "runs"), "max_steps": 50, "eval_steps": 1,
        "early_stopping_patience": 2, "learning_rate": 3.0, "warmup_ratio": 0.0, "max_grad_norm": 0.0,
        "training_subset": 2, "eval_subset": 20, "max_seq_length": 64, "train_batch_size": 4, "save_steps": 0,
        "report_to": "none", "progress": False, "logging_steps": 1, "run_id": None,
    }))
    done = subprocess.run(train_argv("--config", str(config), "--bf16", "--max_steps", "12"), cwd=tmp_path,
                          env=env_with(CLOUD_ML_JOB_ID="vertex-job-42"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "vertex-job-42"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "early stopping (no improvement in 2 evaluations)", summary
    assert summary["steps"] < 12  # the flag overrode the file's max_steps 50, and the run stopped before it
    manifest = read_manifest(latest_checkpoint(run_dir / "checkpoints"))
    trained_with = manifest.training_config
    assert trained_with["bf16"] is True and trained_with["learning_rate"] == 3.0 and trained_with["max_steps"] == 12
    assert manifest.global_step == summary["steps"]


def test_evaluating_before_the_first_log_line_without_a_progress_bar(small_model_dir, tmp_path):
    from dylora_moe.train.trainer import Trainer

    config = TrainConfig(model_name=small_model_dir, output_dir=str(tmp_path), run_id="quiet", report_to="none",
                         progress=False, training_subset=2, eval_subset=20, max_seq_length=64, max_steps=1,
                         eval_steps=1, logging_steps=10)
    summary = Trainer(config).setup().train()
    assert summary["steps"] == 1
