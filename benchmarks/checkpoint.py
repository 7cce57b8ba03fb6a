"""What durable checkpoints cost, on the shipped model with the default mixture (E=4, r=16).

1. size:      checkpoint bytes / (trainable parameter bytes + optimizer state bytes)  target <= 1.05
2. blocking:  blocking save time / training time at the default cadence (--save_steps 100)   target <= 2%
3. resume:    time to fetch, verify and restore a checkpoint at step 10,000 vs at step 10 target <= 1.1x
4. SIGTERM:   signal to durable (checkpoint written, published, process exited)            target <= 10 s

Ratios are measured side by side in one run. Usage: python benchmarks/checkpoint.py [--train_steps 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dylora_moe.checkpoint.format import read_manifest
from dylora_moe.checkpoint.references import fetch
from dylora_moe.train.checkpoint_payload import restore_training_checkpoint, save_training_checkpoint
from dylora_moe.train.config import TrainConfig
from dylora_moe.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def trainer(out: Path, run_id: str, **overrides) -> Trainer:
    cfg = TrainConfig(output_dir=str(out), run_id=run_id, report_to="none", progress=False, eval_steps=0,
                      save_steps=0, **overrides)
    return Trainer(cfg).setup()


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def train_steps(t: Trainer, steps: int) -> float:
    """Seconds per optimizer step over ``steps`` steps of the real loop body."""
    from torch.utils.data import DataLoader

    t.model.train()
    t.sampler.set_epoch(0)
    batches = iter(DataLoader(t.train_data, batch_sampler=t.sampler, collate_fn=t.collator,
                              generator=torch.Generator()))
    t.train_step([next(batches)])  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        t.train_step([next(batches)])
        t.state.global_step += 1
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="dylora-ckpt-bench-"))
    t = trainer(out, "bench")
    print(f"model: {t.config.model_name}, experts {t.config.num_experts}, r {t.config.lora_r}, "
          f"trainable params {sum(p.numel() for p in t.model.trainable_parameters()):,}")

    # 2. blocking save share (and 1. size, from the checkpoints it writes)
    step_s = train_steps(t, args.train_steps)
    saves = []
    for i in range(args.repeats):
        t.state.global_step += 1
        start = time.perf_counter()
        t.save_checkpoint()  # what the loop blocks on: write + fsync + rename, then a background publish
        saves.append(time.perf_counter() - start)
    t.checkpointer.flush(60)
    save_s = statistics.median(saves)
    cadence = TrainConfig().save_steps  # the default --save_steps
    share = save_s / (cadence * step_s)
    ckpt = t.checkpointer.checkpoint_dir / f"step-{t.state.global_step:08d}"
    files = read_manifest(ckpt).total_size + (ckpt / "manifest.json").stat().st_size
    payload = (sum(p.numel() * p.element_size() for p in t.model.trainable_parameters())
               + tensor_bytes(t.optimizer.state_dict()["state"]))
    print(f"1. size: checkpoint {files:,} B / (trainable + optimizer state) {payload:,} B = {files / payload:.3f} "
          "(target <= 1.05)")
    print(f"2. blocking save {save_s * 1000:.0f} ms, training step {step_s * 1000:.0f} ms: "
          f"share at save_steps={cadence} "
          f"= {share * 100:.2f}% (target <= 2%)")

    # 3. resume at step 10 vs step 10,000 (history of one logged row per 10 steps, as by default)
    dirs = {}
    for step in (10, 10_000):
        t.state.global_step = step
        t.state.epoch, t.state.batch_in_epoch = divmod(step, t.sampler.num_batches)
        row = {k: 1.0 for k in ("train/lm_loss", "train/balance_loss", "train/z_loss", "train/entropy",
                                "train/max_prob",
                                "routing/usage_0", "routing/usage_1", "routing/usage_2", "routing/usage_3")}
        t.state.history, t.state.history_base = [{"step": s, **row} for s in range(10, step + 1, 10)], 0
        rows = t.history.write(t.state)  # what a save writes: the history beside, then the checkpoint
        dirs[step] = save_training_checkpoint(t.checkpointer.checkpoint_dir, t.model, t.optimizer, t.scheduler, t.state,
                                              rows, t.run_record())
    times = {10: [], 10_000: []}
    for _ in range(args.repeats):
        for step, directory in dirs.items():
            start = time.perf_counter()
            t.state = restore_training_checkpoint(fetch(str(directory), out / "downloads"), t.model, t.optimizer,
                                                  t.scheduler)
            assert t.state.global_step == step
            t.sampler.set_epoch(t.state.epoch, start_batch=t.state.batch_in_epoch)
            next(iter(t.sampler))  # the first batch after the resume point, without replaying
            times[step].append(time.perf_counter() - start)
    r10, r10k = statistics.median(times[10]), statistics.median(times[10_000])
    print(f"3. resume at step 10: {r10 * 1000:.0f} ms, at step 10,000: {r10k * 1000:.0f} ms, "
          f"ratio {r10k / r10:.2f} (target <= 1.1)")

    # 4. SIGTERM to durable, on a real `dylora train` subprocess
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "dylora_moe.cli", "train", "--output_dir", str(out), "--run_id", "spot",
           "--report_to", "none", "--progress", "false", "--eval_steps", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "held-out loss of the base model" in line:
            break
    time.sleep(3)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.stderr.read()
    code = proc.wait()
    durable = time.perf_counter() - sent
    latest = out / "spot" / "store" / "aliases" / "latest.json"
    print(f"4. SIGTERM to durable: {durable:.2f} s, exit status {code}, published latest: {latest.is_file()} "
          "(target <= 10 s)")


if __name__ == "__main__":
    main()
