"""A preempted job that restarts with the same run id continues the SAME W&B run, steps continuing.

The real ``dylora train`` (real wandb client, online mode) talks to a local fake W&B backend
(tests/fakes/wandb_server.py): W&B itself is a boundary we cannot reach offline. Each job is a
separate process, as on a restarted VM (and because a failed ``wandb.init`` leaves the id in use
inside a process).
"""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.fakes.wandb_client import client_env
from tests.fakes.wandb_server import FakeWandb

RUN_ID = "spot-1"


@pytest.fixture
def fake_wandb():
    with FakeWandb() as fake:
        yield fake


def train(model_dir, tmp_path, fake, *extra):
    env = client_env(fake.url, tmp_path)  # one machine: both jobs share its home directory
    argv = [sys.executable, "-m", "dylora_moe.cli", "train", "--model_name", model_dir, "--report_to", "wandb",
            "--run_id", RUN_ID, "--output_dir", str(tmp_path / "out"), "--logging_steps", "1", "--eval_steps", "0",
            "--progress", "false", "--training_subset", "8", "--max_seq_length", "128", "--train_batch_size", "4",
            *extra]
    done = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    log = f"$ {' '.join(argv[1:])}\n--- exit {done.returncode}\n{done.stdout[-4000:]}{done.stderr[-8000:]}"
    return done.returncode, log


@pytest.mark.slow
def test_restarted_job_continues_the_same_wandb_run_and_its_steps(small_model_dir, tmp_path, fake_wandb):
    fake = fake_wandb
    code, log = train(small_model_dir, tmp_path, fake, "--max_steps", "4")
    assert code == 0, log
    assert set(fake.runs) == {RUN_ID}, (fake.runs.keys(), log)
    run = fake.runs[RUN_ID]
    assert run.upserts >= 1 and run.resumed_as_existing == 0 and run.started, (run, log)
    assert run.config["run_id"]["value"] == RUN_ID and run.config["max_steps"]["value"] == 4
    first = [row["global_step"] for row in run.history]
    assert first == [1, 2, 3, 4], (run.history, log)  # one row per optimizer step, x-axis = our global step
    assert all("train/lm_loss" in row for row in run.history), run.history
    assert "eval/loss" in run.history[-1]  # the final evaluation, logged at the last step
    assert run.exit_codes == [0] and run.history_offsets[0] == 0, log
    upserts_before, lines_before, chunks_before = run.upserts, len(run.history), len(run.history_offsets)

    # The restarted job: same command, same run id, resuming from its checkpoint, two more steps.
    code, log = train(small_model_dir, tmp_path, fake, "--max_steps", "6", "--resume", "auto")
    assert code == 0, log
    assert set(fake.runs) == {RUN_ID}, (fake.runs.keys(), log)  # no new W&B run
    assert run.resumed_as_existing == 1, (fake.operations(), log)  # the client was told the run exists...
    assert run.upserts > upserts_before, log  # ...and initialised it again
    assert "Resuming run spot-1" in log, log  # the client's own word that it resumed (not a fresh start)
    assert run.history_offsets[chunks_before] == lines_before, run.history_offsets  # appended, kept the old rows
    assert [row["global_step"] for row in run.history[:lines_before]] == first
    second = [row["global_step"] for row in run.history[lines_before:]]
    assert second == [5, 6], (run.history, log)  # steps continue where they were, nothing dropped
    assert all("train/lm_loss" in row for row in run.history[lines_before:]), run.history
    assert run.summary["global_step"] == 6 and "eval/loss" in run.summary, run.summary
    assert run.config["max_steps"]["value"] == 6, run.config  # the restart's config replaced the old one
    assert run.exit_codes == [0, 0], log
    assert "resumed from" in log and "at step 4" in log, log
    assert not fake.errors, fake.errors
