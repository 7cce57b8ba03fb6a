"""A run's own store, named the way ``dylora ckpt`` shows it (``runs/RUN_ID/store:latest``), works as
the reference of every command: ``train --resume``, ``generate --model`` and ``report routing --model``,
as real ``dylora`` processes on the shipped tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dylora_moe.checkpoint.format import read_manifest
from tests.conftest import REPO_ROOT

TINY = ["--report_to", "none", "--progress", "false", "--training_subset", "2", "--eval_subset", "20",
        "--max_seq_length", "64", "--train_batch_size", "4", "--eval_steps", "0", "--logging_steps", "1"]
PROMPT = ["Return the sum of a and b.", "--max_new_tokens", "12"]


def dylora(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CLOUD_ML_JOB_ID", "SKYPILOT_TASK_ID")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "dylora_moe.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.mark.slow
def test_a_runs_store_reference_resumes_generates_and_reports(tmp_path):
    first = dylora(tmp_path, "train", "--output_dir", "runs", "--run_id", "first", "--max_steps", "2",
                   "--save_steps", "1", *TINY)
    assert first.returncode == 0, first.stderr
    store = tmp_path / "runs" / "first" / "store"  # the default store: RUN_DIR/store
    latest = json.loads((store / "aliases" / "latest.json").read_text())
    assert latest["step"] == 2

    # The reference `dylora ckpt show` accepts, given to --resume (it used to be "the local directory
    # runs/first/store:latest does not exist").
    shown = dylora(tmp_path, "ckpt", "show", "runs/first/store:latest")
    assert shown.returncode == 0 and "step 2, epoch" in shown.stdout, shown.stderr
    resumed = dylora(tmp_path, "train", "--output_dir", "runs", "--run_id", "second", "--max_steps", "3",
                     "--resume", "runs/first/store:latest", *TINY)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from " in resumed.stderr and " at step 2 " in resumed.stderr, resumed.stderr
    assert json.loads((tmp_path / "runs" / "second" / "summary.json").read_text())["steps"] == 3
    downloaded = list((tmp_path / "runs" / "second" / "downloads").iterdir())
    assert [read_manifest(d).global_step for d in downloaded] == [2]  # fetched from the store and verified

    # generate: the store's latest is the run's step-2 checkpoint, so greedy decoding says the same.
    from_store = dylora(tmp_path, "generate", "--model", "runs/first/store:latest", *PROMPT)
    from_dir = dylora(tmp_path, "generate", "--model", "runs/first/checkpoints/step-00000002", *PROMPT)
    assert from_store.returncode == 0 and from_dir.returncode == 0, from_store.stderr + from_dir.stderr
    assert from_store.stdout == from_dir.stdout and from_store.stdout.strip()

    # report routing: from the store; the report lands in the current directory, not in a checkpoint.
    report = dylora(tmp_path, "report", "routing", "--model", "runs/first/store:v0", "--datasets",
                    "stdlib_functions", "--max_seq_length", "64")
    assert report.returncode == 0, report.stderr
    assert "mutual information dataset ; top-1 expert" in report.stdout
    assert json.loads((tmp_path / "routing_report.json").read_text())["datasets"] == ["stdlib_functions"]
    assert (tmp_path / "routing_heatmap.png").is_file()
    assert not list(store.rglob("routing_report.json"))
