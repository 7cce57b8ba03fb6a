"""Which training examples each optimizer step consumed, per rank: a record to check data order.

Set ``DYLORA_TRACE_EXAMPLES=DIR`` and every rank appends one JSON line per optimizer step to
``DIR/examples-rank{R}.jsonl``: ``{"step": S, "rank": R, "world_size": W, "examples": [...]}``,
the examples being row numbers of the training split (the same numbers for the same data, seed
and ``--max_seq_length``). Merging the ranks' lines of a step gives the step's global batch; it is
how the tests show that a run resumed on another number of ranks consumes, step for step, the
examples an uninterrupted run consumes. Off by default: it costs a file append per step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "DYLORA_TRACE_EXAMPLES"


class ExampleTrace:
    def __init__(self, directory: Path, rank: int, world_size: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"examples-rank{rank}.jsonl"
        self.rank, self.world_size = rank, world_size
        self.pending: list[list[int]] = []

    @classmethod
    def from_environment(cls, rank: int, world_size: int) -> "ExampleTrace | None":
        directory = os.environ.get(ENV)
        return cls(Path(directory), rank, world_size) if directory else None

    def start_epoch(self, batches: list[list[int]]) -> None:
        """This rank's micro-batches (row numbers) left in the epoch, in order."""
        self.pending = list(batches)

    def record(self, step: int, micro_batches: int) -> None:
        """Step ``step`` consumed the next ``micro_batches`` of the epoch's."""
        batches, self.pending = self.pending[:micro_batches], self.pending[micro_batches:]
        row = {"step": step, "rank": self.rank, "world_size": self.world_size,
               "examples": [int(i) for batch in batches for i in batch]}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_trace(directory: Path) -> dict[int, list[int]]:
    """Step -> the sorted examples of its global batch (every rank's lines merged; a step recorded
    again after a resume replaces the earlier record)."""
    steps: dict[int, dict[int, list[int]]] = {}
    for path in sorted(Path(directory).glob("examples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], {})[row["rank"]] = row["examples"]
    return {step: sorted(i for ids in ranks.values() for i in ids) for step, ranks in sorted(steps.items())}
