"""Running completions in the sandbox and turning outcomes into pass@k, per task and overall."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .passk import mean_pass_at_k, pass_at_k
from .sandbox import OUTCOMES, Sandbox
from .task import Task


@dataclass
class SampleResult:
    """One line of ``results.jsonl``."""

    model: str
    benchmark: str
    task_id: str
    sample: int
    passed: bool
    outcome: str
    seconds: float
    detail: str
    completion: str


@dataclass
class BenchmarkScore:
    model: str
    benchmark: str
    tasks: int
    samples: int
    pass_at_k: dict[str, float | None]  # "pass@1" -> mean over tasks; None: some task has fewer than k samples
    outcomes: dict[str, int]
    per_task: dict[str, dict] = field(default_factory=dict)  # task id -> {"n", "c", "pass@k"...}
    expert_usage: list[float] | None = None
    timeout_s: float = 0.0


def score_completions(tasks: list[Task], completions: dict[str, list[str]], sandbox: Sandbox, ks: list[int],
                      model: str, *, timeout_s: float | None = None, progress: bool = True
                      ) -> tuple[list[SampleResult], BenchmarkScore]:
    """Run every completion of the tasks that have some; pass@k per task and over those tasks."""
    tasks = [t for t in tasks if completions.get(t.task_id)]
    flat = [(t, i, c) for t in tasks for i, c in enumerate(completions[t.task_id])]
    benchmark = tasks[0].benchmark if tasks else ""
    timeout = timeout_s or (tasks[0].timeout_s if tasks else None)
    bar = tqdm(total=len(flat), desc=f"running {benchmark}", unit="sample", disable=not progress, dynamic_ncols=True)
    lock = threading.Lock()

    def advance(_index, _result) -> None:
        with lock:
            bar.update(1)

    try:
        executed = sandbox.run([t.program(c) for t, _, c in flat], on_result=advance, timeout_s=timeout)
    finally:
        bar.close()
    results = [SampleResult(model, t.benchmark, t.task_id, i, r.passed, r.outcome, round(r.seconds, 4), r.detail, c)
               for (t, i, c), r in zip(flat, executed)]
    counts: dict[str, list[int]] = {t.task_id: [0, 0] for t in tasks}
    for r in results:
        counts[r.task_id][0] += 1
        counts[r.task_id][1] += r.passed
    per_task = {task_id: {"n": n, "c": c, **{f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n}}
                for task_id, (n, c) in counts.items()}
    outcome_counts = Counter(r.outcome for r in results)
    score = BenchmarkScore(
        model=model, benchmark=benchmark, tasks=len(tasks), samples=len(results),
        pass_at_k={f"pass@{k}": mean_pass_at_k(counts.values(), k) for k in ks},
        outcomes={o: outcome_counts.get(o, 0) for o in OUTCOMES}, per_task=per_task, timeout_s=timeout or 0.0,
    )
    return results, score
