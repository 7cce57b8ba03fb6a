"""One run id, one lineage: a reused id is refused without --resume, every step is published once (the
last one too, and a step a signal lands on), and the run ends naming its pictures and next commands."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from dylora_moe.checkpoint.stores import open_store
from tests.conftest import REPO_ROOT
from tests.train.test_hardening import ENV, assert_clean_failure, intact_checkpoints, run, train_argv

pytestmark = pytest.mark.slow


def store_steps(run_dir) -> list[int]:
    return sorted(v.step for v in open_store(str(run_dir / "store")).list_versions())


def test_a_reused_run_id_without_resume_is_refused_and_nothing_changes(small_model_dir, tmp_path):
    first = run(train_argv(small_model_dir, tmp_path, "t6", "--max_steps", "6", "--save_steps", "3"))
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "t6"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    again = run(train_argv(small_model_dir, tmp_path, "t6", "--max_steps", "2"))
    assert_clean_failure(again, 2, "run t6 already has checkpoints up to step 6", "add --resume auto to continue it",
                         "or choose another --run_id", "Nothing was changed.")
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # no checkpoint, final model, history or store version touched
    assert intact_checkpoints(run_dir) == [3, 6] and store_steps(run_dir) == [3, 6]


def test_every_step_is_published_once_the_last_one_included(small_model_dir, tmp_path):
    # the last step (5) is no save step and no evaluation step: finish() writes it, once
    done = run(train_argv(small_model_dir, tmp_path, "once", "--max_steps", "5", "--save_steps", "2",
                          "--eval_steps", "3"))
    assert done.returncode == 0, done.stderr
    assert store_steps(tmp_path / "once") == [2, 4, 5]
    # the last step is a save step: its checkpoint already holds the final evaluation
    done = run(train_argv(small_model_dir, tmp_path, "aligned", "--max_steps", "4", "--save_steps", "2"))
    assert done.returncode == 0, done.stderr
    assert store_steps(tmp_path / "aligned") == [2, 4]
    assert "Not moving 'latest'" not in done.stderr
    assert not list((tmp_path / "aligned" / "checkpoints").glob(".tmp-*"))  # no snapshot left behind


def test_a_sigterm_on_a_save_step_publishes_that_step_once(small_model_dir, tmp_path):
    proc = subprocess.Popen(train_argv(small_model_dir, tmp_path, "sig", "--num_epochs", "50", "--save_steps", "1"),
                            cwd=REPO_ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "sig" / "checkpoints" / "step-00000002"
    try:
        while not first.exists() and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err
    steps = store_steps(tmp_path / "sig")
    assert steps == sorted(set(steps)), steps  # no step twice
    assert set(intact_checkpoints(tmp_path / "sig")) <= set(steps)  # every local checkpoint confirmed


def test_the_run_ends_naming_its_pictures_and_the_next_commands(small_model_dir, tmp_path):
    done = run(train_argv(small_model_dir, tmp_path, "pics", "--max_steps", "3", "--report_to", "tensorboard"))
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "pics"
    for picture in ("loss.png", "routing.png"):
        assert (run_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = done.stdout
    assert f"pictures: {run_dir / 'loss.png'}, {run_dir / 'routing.png'}" in out
    assert f"next: dylora generate --model {run_dir / 'final'}" in out
    assert f"dylora eval --model {run_dir / 'final'} --baseline" in out
    assert f"tensorboard --logdir {run_dir}" in out
