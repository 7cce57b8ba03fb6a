"""pass@1 at the trainer's evaluation points (``--eval_benchmarks humaneval --eval_every N``).

The same tasks, prompts, sandbox and estimator as ``dylora eval``, on the first ``max_tasks``
tasks of each benchmark with greedy decoding: a real, if small, measurement of whether training
makes the model write code that passes tests. There is no heuristic anywhere.
"""

from __future__ import annotations

from functools import lru_cache

from .benchmarks import check_benchmarks, load_tasks
from .generation import SamplingSettings, generate_completions
from .report import metrics_of
from .sandbox import Sandbox
from .scoring import score_completions
from .task import Task


@lru_cache(maxsize=8)
def _tasks(benchmark: str, data_dir: str | None) -> tuple[Task, ...]:
    return tuple(load_tasks(benchmark, data_dir))


def evaluate_during_training(model, tokenizer, benchmarks: list[str], max_tasks: int, *, data_dir: str | None = None,
                             max_new_tokens: int = 256, batch_size: int = 16, isolation: str = "auto",
                             progress: bool = False) -> dict[str, float]:
    """``eval/<benchmark>/pass@1`` and the share of each outcome, for the model as it is now.

    The model is put in eval mode for generation and returned to its previous mode.
    """
    check_benchmarks(benchmarks)
    settings = SamplingSettings(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    metrics: dict[str, float] = {}
    with Sandbox(isolation=isolation) as sandbox:
        for benchmark in benchmarks:
            tasks = list(_tasks(benchmark, data_dir)[:max_tasks])
            generated = generate_completions(model, tokenizer, tasks, settings, progress=progress,
                                             description=f"pass@1 on {benchmark}")
            _, score = score_completions(tasks, generated.completions, sandbox, [1], "", progress=False)
            metrics.update(metrics_of([score]))
            if generated.expert_usage:
                metrics.update({f"eval/{benchmark}/expert_usage/e{i}": u for i, u in enumerate(generated.expert_usage)})
    return metrics
