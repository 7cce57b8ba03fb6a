"""The training loop's side concerns, each a small helper the loop calls at a known point.

- :class:`EarlyStopping`: after each evaluation, record the loss and say whether to stop;
- :class:`MaturitySchedule`: after each optimizer step, switch routing to top-k once the run
  has done ``--maturity_fraction`` of its steps;
- :class:`MetricWindow`: the training metrics of the last ``--logging_steps`` steps, averaged.

Preemption (signals, exit 75) is ``runtime/signals.py``, the run directory's lock ``run_lock.py``.
They read and write :class:`TrainerState` only, so they need neither the trainer nor each other.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..model import DyLoRAMoE
from .config import TrainConfig
from .state import TrainerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EarlyStopping:
    patience: int
    disabled: bool = False

    @classmethod
    def for_config(cls, config: TrainConfig) -> "EarlyStopping":
        return cls(config.early_stopping_patience, config.disable_early_stopping)

    def record(self, state: TrainerState, loss: float) -> bool:
        """Record a validation loss at ``state.global_step``; True when early stopping says stop."""
        state.last_eval_loss, state.last_eval_step = loss, state.global_step
        if state.best_eval_loss is None or loss < state.best_eval_loss:
            state.best_eval_loss, state.best_step, state.evals_without_improvement = loss, state.global_step, 0
        else:
            state.evals_without_improvement += 1
        return not self.disabled and self.patience > 0 and state.evals_without_improvement >= self.patience

    def reason(self) -> str:
        return f"early stopping (no improvement in {self.patience} evaluations)"


@dataclass(frozen=True)
class MaturitySchedule:
    fraction: float
    top_k: int

    @classmethod
    def for_config(cls, config: TrainConfig) -> "MaturitySchedule":
        return cls(config.maturity_fraction, config.top_k)

    def update(self, model: DyLoRAMoE, state: TrainerState, total_steps: int) -> None:
        """Make every expert mature once ``fraction`` of ``total_steps`` are done (once per run)."""
        if state.maturity_step is None and state.global_step >= self.fraction * total_steps and self.fraction < 1:
            model.set_maturity()
            state.maturity_step = state.global_step
            log.info("step %d: all experts mature, routing switches to top-%d", state.global_step, self.top_k)


@dataclass
class MetricWindow:
    """Per-step training metrics since the last logged row, and when that window started."""

    steps: list[dict[str, float]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, metrics: dict[str, float]) -> None:
        self.steps.append(metrics)

    def __bool__(self) -> bool:
        return bool(self.steps)

    def close(self, learning_rate: float, dense: bool) -> dict[str, float]:
        """The window's means (and throughput); the window starts again, empty."""
        window, seconds = self.steps, time.perf_counter() - self.started
        keys = [k for k in window[0] if k != "tokens"]
        mean = {k: sum(m[k] for m in window) / len(window) for k in keys}
        mean["train/tokens_per_s"] = sum(m["tokens"] for m in window) / max(seconds, 1e-9)
        mean["train/learning_rate"] = learning_rate
        mean["routing/dense"] = float(dense)
        self.steps, self.started = [], time.perf_counter()
        return mean
