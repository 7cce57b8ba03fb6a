"""A benchmark task, the program that checks a completion of it, and the registry of benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class Task:
    """One problem: the model completes ``prompt``; ``program(completion)`` runs its tests.

    The checked program is ``program_prefix + completion + "\\n" + tests``: HumanEval puts the
    prompt (signature and docstring) in front of the completion, MBPP the completion alone.
    """

    benchmark: str
    task_id: str
    prompt: str
    program_prefix: str
    tests: str
    stop_sequences: tuple[str, ...]
    reference: str  # the dataset's own solution, in completion form
    timeout_s: float  # the benchmark's default wall-clock limit per program

    def program(self, completion: str) -> str:
        return f"{self.program_prefix}{completion}\n{self.tests}\n"

    def truncate(self, text: str) -> str:
        """The completion: generated text cut at the first stop sequence."""
        cut = min((i for i in (text.find(s) for s in self.stop_sequences) if i >= 0), default=len(text))
        return text[:cut]


def _loaders() -> dict[str, Callable[..., list[Task]]]:
    from . import humaneval, mbpp

    return {"humaneval": humaneval.load_tasks, "mbpp": mbpp.load_tasks}


KNOWN_BENCHMARKS = ("humaneval", "mbpp")


def check_benchmarks(names: list[str], flag: str = "--benchmarks") -> list[str]:
    unknown = [n for n in names if n not in KNOWN_BENCHMARKS]
    if unknown or not names:
        raise ConfigError(f"{flag} {','.join(names)!r}: unknown benchmark(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"known: {', '.join(KNOWN_BENCHMARKS)}.")
    return names


def load_tasks(benchmark: str, data_dir: str | None = None) -> list[Task]:
    """Every task of ``benchmark`` in its dataset order."""
    check_benchmarks([benchmark])
    return _loaders()[benchmark](data_dir=data_dir)


def select_tasks(tasks: list[Task], task_ids: list[str] | None, limit: int | None) -> list[Task]:
    """``--tasks``: ids as written (``HumanEval/3``, ``MBPP/11``) or the number alone; then ``--limit``."""
    if task_ids:
        by_id = {t.task_id: t for t in tasks}
        by_number = {t.task_id.rsplit("/", 1)[-1]: t for t in tasks}
        chosen = [by_id.get(i) or by_number.get(i) for i in task_ids]
        chosen = [t for t in chosen if t is not None]
        tasks = list(dict.fromkeys(chosen))
    return tasks[:limit] if limit else tasks
