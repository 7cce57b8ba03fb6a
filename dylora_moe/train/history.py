"""The run's metric history: one row per optimizer step, for the sink (W&B or none) and the routing
picture.

The rows of this process are in ``TrainerState.history``; the rows before a resume stay in
``RUN_DIR/history.jsonl``, written whole before each checkpoint (the checkpoint records how many
rows belong to it), and are read only when the whole history is needed. A checkpoint therefore
costs the same at step 10 and step 10,000.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..runtime.tracking import MetricsSink, make_sink
from .state import TrainerState

HISTORY_NAME = "history.jsonl"


def write_history(run_dir: Path, history: list[dict]) -> None:
    tmp = run_dir / f".{HISTORY_NAME}.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    tmp.replace(run_dir / HISTORY_NAME)


def read_history(run_dir: Path, rows: int) -> list[dict]:
    path = run_dir / HISTORY_NAME
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()[:rows]
    return [json.loads(line) for line in lines]


class MetricHistory:
    """Adds metrics to the current step's row; the sink gets each row once it is complete.

    The sink is rank 0's (:meth:`open_sink`); until it is open, and on the other ranks, rows go nowhere."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.sink, self.sink_open = MetricsSink(), False
        self._unflushed = False  # the last row has metrics the sink has not seen

    def open_sink(self, config, run_id: str) -> None:
        """Open ``--report_to``'s sink (once; ``config``: the run's ``TrainConfig``)."""
        if not self.sink_open:
            self.sink = make_sink(config.report_to, run_id, self.run_dir, config.wandb_project, config.wandb_entity,
                                  config.to_dict())
            self.sink_open = True

    def log(self, state: TrainerState, metrics: dict[str, float]) -> None:
        history, step = state.history, state.global_step
        if history and history[-1]["step"] == step:
            history[-1].update(metrics)
        else:
            history.append({"step": step, **metrics})
        self._unflushed = True

    def flush(self, state: TrainerState) -> None:
        if self._unflushed:
            row = dict(state.history[-1])
            self.sink.log({k: v for k, v in row.items() if k != "step"}, row["step"])
            self._unflushed = False

    def full(self, state: TrainerState) -> list[dict[str, Any]]:
        """Every logged row of the run, including those before a resume."""
        return read_history(self.run_dir, state.history_base) + state.history

    def write(self, state: TrainerState) -> int:
        """Write the whole history to ``history.jsonl``; the number of rows."""
        history = self.full(state)
        write_history(self.run_dir, history)
        return len(history)
