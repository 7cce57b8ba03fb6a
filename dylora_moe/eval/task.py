"""A benchmark task and the program that checks a completion of it."""

from __future__ import annotations

from dataclasses import dataclass


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
