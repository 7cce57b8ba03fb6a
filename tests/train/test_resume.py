"""Durable checkpoints in training: exact resume, fingerprint checks, references, preemption."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dylora_moe.checkpoint.directory import list_checkpoints
from dylora_moe.checkpoint.format import verify_checkpoint
from dylora_moe.cli import main
from dylora_moe.errors import EXIT_PREEMPTED, Preempted
from dylora_moe.train.config import TrainConfig
from dylora_moe.train.trainer import Trainer
from tests.conftest import REPO_ROOT


def config(model_dir, out, run_id, **overrides):
    values = dict(
        model_name=model_dir, report_to="none", progress=False, max_seq_length=128, training_subset=8,
        train_batch_size=4, gradient_accumulation_steps=3, eval_steps=4, logging_steps=1, save_steps=0,
        num_epochs=2, lora_dropout=0.1, output_dir=str(out), run_id=run_id, learning_rate=1e-3,
    )
    values.update(overrides)
    return TrainConfig(**values)


def losses(trainer):
    return [h["train/lm_loss"] for h in trainer.full_history() if "train/lm_loss" in h]


def interrupt_during_micro_batch(trainer, step, micro_batch):
    """Send a real SIGTERM to this process during the forward pass of micro-batch `micro_batch` of `step`."""
    forward, calls = trainer.model.forward, {"n": 0}
    per_step = trainer.config.gradient_accumulation_steps

    def forward_and_signal(*args, **kwargs):
        if trainer.model.training:  # evaluation passes do not count
            calls["n"] += 1
            if calls["n"] == (step - 1) * per_step + micro_batch:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(*args, **kwargs)

    trainer.model.forward = forward_and_signal


@pytest.mark.slow
def test_interrupted_mid_epoch_and_mid_accumulation_resumes_bit_identically(small_model_dir, tmp_path):
    full = Trainer(config(small_model_dir, tmp_path, "full")).setup()
    full.train()
    assert full.total_steps > 6 and full.steps_per_epoch > 5  # step 5 is inside the first epoch

    cut = Trainer(config(small_model_dir, tmp_path, "cut")).setup()
    interrupt_during_micro_batch(cut, step=5, micro_batch=2)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Preempted, match="stopped by SIGTERM at step 5"):
            cut.train()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    saved = verify_checkpoint(tmp_path / "cut" / "checkpoints" / "step-00000005")
    assert saved.data_state["batch_in_epoch"] == 15 and saved.global_step == 5
    assert json.loads((tmp_path / "cut" / "store" / "aliases" / "latest.json").read_text())["step"] == 5

    resumed = Trainer(config(small_model_dir, tmp_path, "cut", resume="auto")).setup()
    assert resumed.state.global_step == 5
    resumed.train()
    a, b = full.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(full) == losses(resumed) and len(losses(full)) == full.total_steps


@pytest.mark.slow
def test_fingerprint_mismatch_exits_2_with_a_table_before_training(small_model_dir, tmp_path, capsys):
    Trainer(config(small_model_dir, tmp_path, "a", max_steps=2, eval_steps=0)).setup().train()
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000002"
    argv = ["train", "--model_name", small_model_dir, "--output_dir", str(tmp_path), "--run_id", "b",
            "--report_to", "none", "--progress", "false", "--resume", str(ckpt), "--training_subset", "8",
            "--max_seq_length", "128"]
    capsys.readouterr()
    assert main([*argv, "--lora_r", "8", "--num_experts", "5"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the requested model" in err and "--grow_experts" in err
    lines = err.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.split()[:1] == ["field"]):]
    assert table[0].split() == ["field", "checkpoint", "requested"]
    assert {row.split()[0] for row in table[1:]} == {"r", "num_experts"}
    assert not (tmp_path / "b" / "checkpoints").exists()  # nothing trained, nothing written

    # A larger expert count is allowed with --grow_experts; the new expert starts immature.
    grown = Trainer(config(small_model_dir, tmp_path, "c", resume=str(ckpt), num_experts=5, grow_experts=True,
                           max_steps=3, eval_steps=0)).setup()
    assert grown.model.num_experts == 5 and grown.state.global_step == 2
    assert grown.scheduler.last_epoch == 2  # the schedule continues from the checkpoint's step
    assert grown.optimizer.param_groups[0]["lr"] == grown.scheduler.get_last_lr()[0] > 0  # not restarted at 0
    assert grown.model.routing.mature.tolist()[4] is False
    # Hyper-parameters outside the fingerprint may change.
    changed = Trainer(config(small_model_dir, tmp_path, "d", resume=str(ckpt), learning_rate=5e-4,
                             train_batch_size=2)).setup()
    assert changed.state.global_step == 2
    group = changed.optimizer.param_groups[0]
    assert changed.scheduler.base_lrs == [5e-4] and group["initial_lr"] == 5e-4  # the new peak applies
    assert group["lr"] == changed.scheduler.get_last_lr()[0] > 0 and changed.scheduler.last_epoch == 2


@pytest.mark.slow
def test_unfetchable_reference_fails_unless_fresh_start_is_allowed(small_model_dir, tmp_path, capsys):
    base = ["train", "--model_name", small_model_dir, "--output_dir", str(tmp_path), "--run_id", "r",
            "--report_to", "none", "--progress", "false", "--training_subset", "8", "--max_seq_length", "128",
            "--max_steps", "1", "--eval_steps", "0"]
    assert main([*base, "--resume", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "Traceback" not in err
    capsys.readouterr()
    assert main([*base, "--resume", "memory://bucket/none:latest", "--allow_fresh_start"]) == 0
    captured = capsys.readouterr()
    assert "Starting fresh instead (--allow_fresh_start)" in captured.err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 1  # started at step 0: one step of --max_steps 1 was trained
    assert "resumed from" not in captured.err


@pytest.mark.slow
def test_sigterm_to_a_real_dylora_train_then_resume_auto(small_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "dylora_moe.cli", "train", "--model_name", small_model_dir, "--output_dir",
            str(tmp_path), "--run_id", "spot", "--report_to", "none", "--progress", "false", "--training_subset", "8",
            "--max_seq_length", "128", "--num_epochs", "50", "--eval_steps", "0", "--logging_steps", "1",
            "--train_batch_size", "4", "--resume", "auto", "--save_steps", "1"]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "spot" / "checkpoints" / "step-00000001"
    while not first.exists() and proc.poll() is None:  # wait until it is training (a step is saved)
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == EXIT_PREEMPTED, err
    assert "and published in" in " ".join(err.split())  # within the preemption budget, as the message says
    assert "Continue with --resume auto --run_id spot" in err
    latest = json.loads((tmp_path / "spot" / "store" / "aliases" / "latest.json").read_text())
    step, newest = list_checkpoints(tmp_path / "spot" / "checkpoints")[-1]
    verify_checkpoint(newest)
    assert step >= 1 and f"stopped by SIGTERM at step {step}" in err
    assert latest["step"] == step  # the store's latest is the preempted step's checkpoint

    argv[argv.index("--num_epochs") + 1] = "1"
    argv += ["--max_steps", str(step + 2)]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr and f"at step {step}" in done.stderr
    summary = json.loads((tmp_path / "spot" / "summary.json").read_text())
    assert summary["steps"] == step + 2


@pytest.mark.slow
def test_ckpt_list_show_verify_and_corruption(small_model_dir, tmp_path, capsys):
    Trainer(config(small_model_dir, tmp_path, "k", max_steps=4, save_steps=2, eval_steps=2)).setup().train()
    run = tmp_path / "k"
    capsys.readouterr()
    assert main(["ckpt", "list", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step-00000002" in out and "step-00000004" in out and "latest" in out and "step-4" in out
    assert main(["ckpt", "show", f"{run / 'store'}:latest"]) == 0
    out = capsys.readouterr().out
    assert "step 4," in out and "num_experts: 4" in out and '"batch_in_epoch"' in out
    assert main(["ckpt", "verify", f"file://{run / 'store'}:step-2"]) == 0
    assert "ok:" in capsys.readouterr().out
    weights = run / "checkpoints" / "step-00000004" / "dylora_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["ckpt", "verify", str(run / "checkpoints" / "step-00000004")]) == 1
    assert "dylora_model.safetensors" in capsys.readouterr().err
    # `auto` does not trust the corrupted local copy: it takes the store's verified copy of that step.
    resumed = Trainer(config(small_model_dir, tmp_path, "k", resume="auto", max_steps=5)).setup()
    assert resumed.state.global_step == 4 and "downloads" in str(resumed.resume_dir)
