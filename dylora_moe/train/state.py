"""The progress of a run: what, besides tensors, a resume must restore."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

NOT_SAVED = ("history", "history_base")  # the history is saved beside the checkpoints (see history.py)


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed (this rank)
    tokens_seen: int = 0
    eval_loss_base: float | None = None
    best_eval_loss: float | None = None
    last_eval_loss: float | None = None
    last_eval_step: int | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    maturity_step: int | None = None
    train_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # rows logged since this process started
    history_base: int = 0  # rows before those, kept in RUN_DIR/history.jsonl (read only when needed)

    def progress(self, history_rows: int) -> dict[str, Any]:
        """What ``trainer_state.json`` holds: every field but the history, and the history's length."""
        saved = {k: v for k, v in asdict(self).items() if k not in NOT_SAVED}
        saved["history_rows"] = history_rows
        return saved

    @classmethod
    def from_progress(cls, saved: dict[str, Any]) -> "TrainerState":
        """The state of a saved ``trainer_state.json``; its history stays on disk until needed."""
        state = cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})
        state.history_base = saved.get("history_rows", 0)
        return state
