"""The training loop's side concerns, each a small helper the loop calls at a known point.

- :class:`EarlyStopping`: after each evaluation, record the loss and say whether to stop;
- :class:`MaturitySchedule`: after each optimizer step, switch routing to top-k once the run
  has done ``--maturity_fraction`` of its steps;
- :class:`StepMetrics`: one optimizer step's losses and router statistics, over its micro-batches
  and then over the ranks; :func:`validation_loss`: the held-out loss at an evaluation point;
- :class:`MetricWindow`: the training metrics of the last ``--logging_steps`` steps, averaged.

Preemption (signals, exit 75) is ``runtime/signals.py``, the run directory's lock ``run_lock.py``.
They are given what they work on (the state, the model, the ranks), so they need neither the trainer
nor each other.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Iterable

import torch
import torch.nn.functional as F

from ..model import DyLoRAMoE
from .config import TrainConfig
from .state import TrainerState

if TYPE_CHECKING:
    from .distributed import Ranks

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


@torch.no_grad()
def validation_loss(model: DyLoRAMoE, batches: Iterable[dict[str, torch.Tensor]], ranks: "Ranks", device: torch.device,
                    autocast: Callable[[], ContextManager], real_batches: int) -> float:
    """Token-weighted mean LM loss (response tokens only) over this rank's share of the validation
    ``batches``, summed with every other rank's: the same on every rank. Of all ranks' batches the
    first ``real_batches`` count; the rest are repeats that keep the ranks in step."""
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for index, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():  # per-example routing reads the prompt
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                           prompt_mask=batch["labels"] == -100).logits
        if ranks.rank + index * ranks.world_size < real_batches:
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((labels != -100).sum())
    model.train(was_training)
    total, count = ranks.sum([total, count])
    return total / max(count, 1)


class StepMetrics:
    """The metrics of one optimizer step: losses and router statistics averaged over its micro-batches,
    per-expert usage, the tokens it consumed; then the whole global batch's (means over the ranks,
    tokens summed)."""

    LOSSES = ("lm_loss", "balance_loss", "z_loss")

    def __init__(self, num_experts: int, micro_batches: int):
        self.n = micro_batches
        self.sums = dict.fromkeys((*self.LOSSES, "entropy", "max_prob"), 0.0)
        self.usage = torch.zeros(num_experts)
        self.tokens = 0

    def add(self, out, attention_mask: torch.Tensor) -> None:
        """One micro-batch's forward output (a ``DyLoRAOutput``)."""
        self.tokens += int(attention_mask.sum())
        for key in self.LOSSES:
            self.sums[key] += getattr(out, key).item() / self.n
        if out.router_stats is not None:
            self.sums["entropy"] += out.router_stats.entropy.item() / self.n
            self.sums["max_prob"] += out.router_stats.max_prob.item() / self.n
            self.usage += out.router_stats.expert_usage.detach().float().cpu() / self.n

    def result(self, ranks: "Ranks", grad_norms: torch.Tensor) -> dict[str, float]:
        """``train/*``, ``routing/usage_E``, ``grad_norm/expert_E`` and ``tokens``, over every rank."""
        sums, usage, tokens = self.sums, self.usage, self.tokens
        if ranks.enabled:  # every rank calls it
            world = ranks.world_size
            reduced = ranks.sum([*sums.values(), *usage.tolist(), tokens])
            sums = {k: v / world for k, v in zip(sums, reduced)}
            usage = torch.tensor(reduced[len(sums): len(sums) + len(usage)]) / world
            tokens = int(reduced[-1])
        metrics = {f"train/{k}": v for k, v in sums.items()}
        metrics.update({f"routing/usage_{e}": float(u) for e, u in enumerate(usage)})
        metrics.update({f"grad_norm/expert_{e}": float(g) for e, g in enumerate(grad_norms)})
        metrics["tokens"] = tokens
        return metrics


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
