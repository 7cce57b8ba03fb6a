"""Distributed training: N ranks against 1 rank at the same per-rank batch, side by side in one run.

Each case is a real training process built like ``dylora train`` builds it (``Trainer(TrainConfig)
.setup()`` on the shipped ``tiny-python-lm`` and the built-in ``stdlib_functions`` data): the N-rank
case runs under a real ``torchrun --standalone --nproc_per_node N`` (gloo on CPU, NCCL on GPUs), the
1-rank case as a plain process. Every worker has ``OMP_NUM_THREADS`` = ``--threads`` (1 by default),
runs ``--warmup`` optimizer steps, then ``--steps`` timed ``Trainer.train_step`` calls on micro-batches
drawn beforehand from the trainer's own (rank-sharded) sampler, and writes its numbers as JSON.
The cases alternate for ``--rounds`` rounds; each measure is the median over the rounds.

Ideal scaling: the same step time and N times the tokens/s. The bytes all-reduced per optimizer
step are measured by a DDP communication hook that wraps torch's default ``allreduce_hook`` and
counts every gradient bucket it sends; they are printed beside the trainable gradients' size and the
frozen base's size (which DDP never registers, so it never goes over the wire).

    python benchmarks/distributed.py [--nproc 2] [--rounds 2] [--steps 10] [--warmup 2]

On a machine with GPUs, ``--nproc`` set to the number of GPUs compares one GPU with all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------- worker (one rank)
class BucketCounter:
    """DDP communication-hook state: torch's default all-reduce, plus a count of what it sends."""

    def __init__(self) -> None:
        self.process_group = None  # None: the default group, as DDP's own hook uses
        self.bytes = 0
        self.buckets = 0

    def reset(self) -> None:
        self.bytes = self.buckets = 0


def counting_allreduce_hook(state: BucketCounter, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    state.bytes += buffer.numel() * buffer.element_size()
    state.buckets += 1
    return allreduce_hook(state.process_group, bucket)


def parameter_bytes(parameters) -> tuple[int, int]:
    """(count, bytes) of ``parameters``."""
    parameters = list(parameters)
    return sum(p.numel() for p in parameters), sum(p.numel() * p.element_size() for p in parameters)


def allreduce_alone_s(ranks, nbytes: int, repeats: int = 10) -> float:
    """Median seconds of one all-reduce of ``nbytes`` of float32 on its own (every rank ready first)."""
    import torch
    import torch.distributed as dist

    if not ranks.enabled or nbytes == 0:
        return 0.0
    tensor = torch.zeros(nbytes // 4, device=ranks.device())
    times = []
    for _ in range(repeats):
        ranks.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        if tensor.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_worker(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    from dylora_moe.train.config import TrainConfig
    from dylora_moe.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    config = TrainConfig(output_dir=args.output_dir, run_id=args.run_id, report_to="none", progress=False,
                         eval_steps=0, save_steps=0, logging_steps=0, model_name=args.model_name,
                         datasets=args.datasets, train_batch_size=args.batch, max_seq_length=args.max_seq_length,
                         gradient_accumulation_steps=1)
    t = Trainer(config).setup()
    ranks = t.ranks
    counter = BucketCounter()
    if ranks.enabled:  # t.train_model is the DDP wrapper
        t.train_model.register_comm_hook(counter, counting_allreduce_hook)

    t.model.train()
    t.sampler.set_epoch(0)
    loader = iter(DataLoader(t.train_data, batch_sampler=t.sampler, collate_fn=t.collator,
                             generator=torch.Generator()))
    needed = (args.warmup + args.steps) * t.plan.accumulation
    if needed > t.sampler.num_batches:
        raise SystemExit(f"only {t.sampler.num_batches} micro-batches per rank in an epoch; ask for fewer steps")
    batches = [next(loader) for _ in range(needed)]
    steps = [batches[i:i + t.plan.accumulation] for i in range(0, needed, t.plan.accumulation)]

    for micro_batches in steps[:args.warmup]:  # DDP rebuilds its buckets after the first step
        t.train_step(micro_batches)
    counter.reset()
    step_s, tokens, padded = [], [], []
    for micro_batches in steps[args.warmup:]:
        start = time.perf_counter()
        metrics = t.train_step(micro_batches)  # tokens: summed over the ranks
        step_s.append(time.perf_counter() - start)
        tokens.append(metrics["tokens"])
        padded.append(sum(b["input_ids"].numel() for b in micro_batches))
    padded_all = ranks.sum(padded)  # every rank's padded micro-batch sizes, summed per step

    trainable = parameter_bytes(t.model.trainable_parameters())
    frozen = parameter_bytes(p for p in t.model.parameters() if not p.requires_grad)
    result = {
        "world_size": ranks.world_size, "backend": ranks.backend or "none", "device": str(t.device),
        "threads": torch.get_num_threads(), "batch": args.batch, "max_seq_length": args.max_seq_length,
        "step_s": step_s, "tokens": tokens,
        "padded_tokens_per_rank": [p / ranks.world_size for p in padded_all],
        "allreduce_bytes_per_step": counter.bytes / args.steps, "buckets_per_step": counter.buckets / args.steps,
        "allreduce_alone_s": allreduce_alone_s(ranks, counter.bytes // args.steps),
        "trainable_params": trainable[0], "trainable_bytes": trainable[1],
        "frozen_params": frozen[0], "frozen_bytes": frozen[1],
    }
    if ranks.is_main:
        Path(args.result).write_text(json.dumps(result))
    t.close()  # the trainer's own teardown: publisher, lock, DDP wrapper, process group


# ---------------------------------------------------------------------- driver
def worker_command(args: argparse.Namespace, nproc: int, out: Path, run_id: str, result: Path) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*launcher, str(HERE), "--worker", "--output_dir", str(out), "--run_id", run_id, "--result", str(result),
            "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch", str(args.batch), "--max_seq_length", str(args.max_seq_length),
            "--model_name", args.model_name, "--datasets", args.datasets]


def run_case(args: argparse.Namespace, nproc: int, out: Path, round_: int) -> dict:
    run_id = f"r{round_}-n{nproc}"
    result = out / f"{run_id}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(worker_command(args, nproc, out, run_id, result), env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the {nproc}-rank worker failed (exit status {proc.returncode})")
    data = json.loads(result.read_text())
    data["wall_s"] = time.perf_counter() - start
    data["step_mean_s"] = statistics.fmean(data["step_s"])
    data["tokens_per_s"] = sum(data["tokens"]) / sum(data["step_s"])
    data["step_per_k_s"] = 1000 * sum(data["step_s"]) / sum(data["padded_tokens_per_rank"])
    print(f"round {round_}: {nproc} rank(s): step {data['step_mean_s']:.3f} s (median "
          f"{statistics.median(data['step_s']):.3f}), {data['tokens_per_s']:.0f} tokens/s, "
          f"all-reduced {data['allreduce_bytes_per_step']:,.0f} B/step in {data['buckets_per_step']:g} bucket(s) "
          f"(alone: {data['allreduce_alone_s'] * 1000:.1f} ms), "
          f"process {data['wall_s']:.0f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    return data


def summarise(results: list[dict]) -> dict:
    """One case over the rounds: the median of each timed measure, the rest as measured (it does not vary)."""
    summary = dict(results[0])
    for key in ("step_mean_s", "step_per_k_s", "tokens_per_s", "allreduce_alone_s"):
        summary[key] = statistics.median(r[key] for r in results)
    summary["padded_mean"] = statistics.fmean(p for r in results for p in r["padded_tokens_per_rank"])
    return summary


def table(one: dict, many: dict, nproc: int) -> str:
    unit = "thread" if one["device"] == "cpu" else "GPU"
    names = [f"1 rank x {one['threads'] if unit == 'thread' else 1} {unit}",
             f"{nproc} ranks x {many['threads'] if unit == 'thread' else 1} {unit}"]
    mb = lambda b: f"{b:,.0f} B ({b / 2**20:.2f} MiB)"  # noqa: E731
    ratio = lambda key: many[key] / one[key]  # noqa: E731
    rows = [
        ("backend", one["backend"], many["backend"], ""),
        ("micro-batch per rank (examples)", one["batch"], many["batch"], ""),
        ("padded tokens per rank per step (mean)", f"{one['padded_mean']:.0f}", f"{many['padded_mean']:.0f}", ""),
        ("step time (mean of the timed steps)", f"{one['step_mean_s']:.3f} s", f"{many['step_mean_s']:.3f} s",
         f"**{ratio('step_mean_s'):.2f}** (ideal 1.00)"),
        ("step time per 1,000 padded tokens per rank", f"{one['step_per_k_s']:.3f} s",
         f"{many['step_per_k_s']:.3f} s", f"**{ratio('step_per_k_s'):.2f}** (ideal 1.00; evens out batch lengths)"),
        ("tokens/s (all ranks, padding not counted)", f"{one['tokens_per_s']:.0f}", f"{many['tokens_per_s']:.0f}",
         f"**{ratio('tokens_per_s'):.2f}x** (ideal {nproc}.00x)"),
        ("bytes all-reduced per optimizer step (counted by the DDP hook)", "0 (no DDP)",
         f"{mb(many['allreduce_bytes_per_step'])} in {many['buckets_per_step']:g} bucket(s)", ""),
        ("one all-reduce of those bytes on its own (after a barrier)", "-",
         f"{many['allreduce_alone_s'] * 1000:.1f} ms",
         f"{many['allreduce_alone_s'] / many['step_mean_s']:.1%} of a step"),
        ("trainable gradient bytes (what DDP registers)", mb(one["trainable_bytes"]), mb(many["trainable_bytes"]),
         f"{many['trainable_params']:,} parameters"),
        ("frozen base bytes (never all-reduced)", mb(one["frozen_bytes"]), mb(many["frozen_bytes"]),
         f"{many['frozen_params']:,} parameters"),
    ]
    lines = [f"| median of the rounds | {names[0]} | {names[1]} | ratio / note |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the distributed case (GPU machine: the GPUs)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (1 rank, N ranks); the median is reported")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before timing")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and torch threads of every rank")
    parser.add_argument("--batch", type=int, default=8, help="--train_batch_size: examples per micro-batch per rank")
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--model_name", default="tiny-python-lm")
    parser.add_argument("--datasets", default="stdlib_functions")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    parser.add_argument("--run_id", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.nproc < 2:
        parser.error("--nproc must be at least 2 (the 1-rank case always runs)")

    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), {torch.cuda.device_count()} GPU(s); "
          f"{args.nproc} ranks vs 1, {args.threads} thread(s) per rank, micro-batch {args.batch} x <= "
          f"{args.max_seq_length} tokens, {args.warmup} warm-up + {args.steps} timed steps, {args.rounds} round(s); "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    singles, multis = [], []
    with tempfile.TemporaryDirectory(prefix="dylora-dist-bench-") as tmp:
        for round_ in range(1, args.rounds + 1):
            singles.append(run_case(args, 1, Path(tmp), round_))
            multis.append(run_case(args, args.nproc, Path(tmp), round_))
    print()
    print(table(summarise(singles), summarise(multis), args.nproc))
    print("\nper round, N-rank / 1-rank: step time " + ", ".join(
        f"{m['step_mean_s'] / s['step_mean_s']:.2f}" for s, m in zip(singles, multis)) + "; tokens/s " + ", ".join(
        f"{m['tokens_per_s'] / s['tokens_per_s']:.2f}x" for s, m in zip(singles, multis)))
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
