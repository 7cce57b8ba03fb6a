"""Chaos in a 2-rank run: SIGKILL a rank or the launcher at random moments, restart with `--resume auto`
each time (as a supervisor would, at once), and the run ends with the trainable weights of an
uninterrupted 2-rank run. Real `torchrun` processes on CPU (gloo)."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.train.test_distributed import final_weights, launch, run, train_argv

pytestmark = pytest.mark.slow

KILLS = ("rank", "launcher", "rank", "launcher")
STEPS = 40  # long enough for every kill to land mid-run; a checkpoint every 2 steps gives many moments
LONGER = ("--max_steps", str(STEPS), "--save_steps", "2", "--eval_steps", "10")


def worker_pids(launcher) -> dict[int, int]:
    """RANK -> pid of the launcher's worker processes; children that come and go are skipped."""
    workers = {}
    try:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    except OSError:
        return workers
    for child in children:
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
        if ranks:
            workers[int(ranks[0])] = int(child)
    return workers


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_until(condition, what: str, limit_s: float = 300.0) -> None:
    """Poll ``condition``; the limit only ends a hung test (it is no assertion about speed)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what} after {limit_s:.0f} s"
        time.sleep(0.05)


def saved_steps(run_dir: Path) -> int:
    """The newest local checkpoint's step (retention removes old ones, so not their count)."""
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    return max(steps, default=0)


def test_sigkills_of_ranks_and_of_the_launcher_then_resume_auto_end_with_the_uninterrupted_weights(
        small_model_dir, tmp_path):
    run(2, train_argv(small_model_dir, tmp_path, "full", *LONGER))
    expected = final_weights(tmp_path / "full")

    chaos_dir = tmp_path / "chaos"
    argv = train_argv(small_model_dir, tmp_path, "chaos", "--resume", "auto", *LONGER)
    moments = random.Random(20261204)
    kills = []
    for target in KILLS:
        launcher = launch(2, argv)
        # a random moment once both ranks train: some time after a checkpoint count, or mid-step
        before = saved_steps(chaos_dir)
        wait_until(lambda: launcher.poll() is not None or (len(worker_pids(launcher)) == 2 and
                                                           saved_steps(chaos_dir) > before), "the next checkpoint")
        if launcher.poll() is not None:  # it finished before this kill: nothing left to interrupt
            break
        time.sleep(moments.uniform(0.0, 1.5))
        workers = worker_pids(launcher)
        if target == "rank":
            os.kill(workers[moments.choice(sorted(workers))], signal.SIGKILL)
        else:
            os.kill(launcher.pid, signal.SIGKILL)
        launcher.communicate(timeout=300)
        # with the launcher gone its ranks get SIGTERM (parent-death signal): they checkpoint and exit
        wait_until(lambda: not any(alive(pid) for pid in workers.values()), "the ranks to exit")
        kills.append((target, saved_steps(chaos_dir)))
    assert len(kills) >= 2 and {"rank", "launcher"} <= {t for t, _ in kills}, kills

    # the restart right after the last kill is not refused as "in use", and completes the run
    log = run(2, argv)
    assert "in use by another run" not in log
    weights = final_weights(chaos_dir)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected), f"weights differ after kills {kills}"
    summary_steps = sorted(int(p.name.split("-")[1]) for p in (chaos_dir / "checkpoints").glob("step-*"))
    assert summary_steps[-1] == STEPS
