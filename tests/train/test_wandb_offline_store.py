"""Checkpoints published as W&B artifacts by a real training run, with the real client offline."""

import hashlib
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_offline_run_stages_checkpoint_artifacts(small_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    for d in ("wandb", "wandb-data", "wandb-cache", "wandb-config"):
        (tmp_path / d).mkdir()
    argv = [sys.executable, "-m", "dylora_moe.cli", "train", "--model_name", small_model_dir, "--output_dir",
            str(tmp_path / "out"), "--run_id", "offline-1", "--report_to", "wandb", "--checkpoint_store", "wandb",
            "--progress", "false", "--training_subset", "8", "--max_seq_length", "128", "--max_steps", "3",
            "--save_steps", "2", "--eval_steps", "0", "--logging_steps", "1"]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # Staging copies files under temporary names: match them by content. Both checkpoints (step 2
    # and the final step 3) were staged whole.
    staged = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "wandb-data").rglob("*") if p.is_file()}
    for step in ("step-00000002", "step-00000003"):
        ckpt = tmp_path / "out" / "offline-1" / "checkpoints" / step
        for name in ("manifest.json", "dylora_model.safetensors", "optimizer.pt", "trainer_state.json"):
            assert hashlib.sha256((ckpt / name).read_bytes()).hexdigest() in staged, (step, name)
    offline_runs = list((tmp_path / "out" / "offline-1").rglob("offline-run-*-offline-1"))  # the run's own dir
    assert offline_runs, list((tmp_path / "out" / "offline-1").rglob("*"))[:20]
    records = b"".join(p.read_bytes() for p in offline_runs[0].rglob("*.wandb"))
    assert b"offline-1-checkpoint" in records and b"best-dylora-model-full" in records
