"""The benchmarks by name: which exist, each one's tasks, and the ``--tasks``/``--limit`` selection.

Each benchmark is a module with ``load_tasks(data_dir=None) -> list[Task]``; this registry lists
them and they know nothing of it, so imports run one way (benchmarks -> humaneval, mbpp -> task).
"""

from __future__ import annotations

from typing import Callable

from ..errors import ConfigError
from .task import Task

KNOWN_BENCHMARKS = ("humaneval", "mbpp")


def _loader(benchmark: str) -> Callable[..., list[Task]]:
    # Imported when tasks are wanted, not with the registry: mbpp loads the datasets library, and
    # the flags of `dylora eval` and `dylora train` (which name the benchmarks) must not.
    from . import humaneval, mbpp

    return {"humaneval": humaneval.load_tasks, "mbpp": mbpp.load_tasks}[benchmark]


def check_benchmarks(names: list[str], flag: str = "--benchmarks") -> list[str]:
    unknown = [n for n in names if n not in KNOWN_BENCHMARKS]
    if unknown or not names:
        raise ConfigError(f"{flag} {','.join(names)!r}: unknown benchmark(s) "
                          f"{', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"known: {', '.join(KNOWN_BENCHMARKS)}.")
    return names


def load_tasks(benchmark: str, data_dir: str | None = None) -> list[Task]:
    """Every task of ``benchmark`` in its dataset order."""
    check_benchmarks([benchmark])
    return _loader(benchmark)(data_dir=data_dir)


def select_tasks(tasks: list[Task], task_ids: list[str] | None, limit: int | None) -> list[Task]:
    """``--tasks``: ids as written (``HumanEval/3``, ``MBPP/11``) or the number alone; then ``--limit``."""
    if task_ids:
        by_id = {t.task_id: t for t in tasks}
        by_number = {t.task_id.rsplit("/", 1)[-1]: t for t in tasks}
        chosen = [by_id.get(i) or by_number.get(i) for i in task_ids]
        chosen = [t for t in chosen if t is not None]
        tasks = list(dict.fromkeys(chosen))
    return tasks[:limit] if limit else tasks
