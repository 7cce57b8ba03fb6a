"""How many micro-batches make one optimizer step, over how many ranks: :class:`BatchPlan`.

The global batch of a step is ``micro_batches_per_step`` micro-batches of ``--train_batch_size``
examples, spread over the ranks: each rank runs ``accumulation`` of them. A fresh run takes
``world_size x --gradient_accumulation_steps``. A resumed run keeps the checkpoint's number
whatever its world size, by recomputing the accumulation, so the global batch and the order of
the examples stay those of the run that saved it; a world size that cannot reproduce it is refused
before anything trains. :meth:`BatchPlan.samplers` cuts the data into this rank's batches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..data import LengthGroupedBatchSampler
    from .checkpoint_payload import TrainingPayload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    rank: int
    micro_batches_per_step: int  # over every rank: world size x accumulation
    train_batch_size: int
    saved_world_size: int | None = None  # the checkpoint's, when resumed

    @classmethod
    def for_run(cls, world_size: int, gradient_accumulation_steps: int, train_batch_size: int,
                saved: "TrainingPayload | None" = None, rank: int = 0) -> "BatchPlan":
        """This run's plan (on rank ``rank``): its own, or the checkpoint's global batch (``saved``)."""
        if saved is None:
            return cls(world_size, rank, world_size * gradient_accumulation_steps, train_batch_size)
        micro_batches, saved_world = saved.micro_batches_per_step, saved.world_size
        saved_batch = saved.data_state.get("train_batch_size")
        if micro_batches % world_size:
            raise ConfigError(
                f"the checkpoint was trained with a global batch of {micro_batches} micro-batches per optimizer step "
                f"({saved_world} rank(s) x {micro_batches // saved_world} accumulation step(s) x --train_batch_size "
                f"{saved_batch or train_batch_size}), which {world_size} ranks cannot reproduce: resume on a number "
                f"of ranks that divides {micro_batches} (e.g. "
                f"{', '.join(str(n) for n in range(1, micro_batches + 1) if micro_batches % n == 0)}).")
        if saved_batch and saved_batch != train_batch_size:
            log.warning("--train_batch_size %d differs from the checkpoint's %d: the global batch and the order of "
                        "the examples change from here on", train_batch_size, saved_batch)
        return cls(world_size, rank, micro_batches, train_batch_size, saved_world_size=saved_world)

    @property
    def accumulation(self) -> int:
        """Micro-batches each rank runs per optimizer step."""
        return self.micro_batches_per_step // self.world_size

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over every rank."""
        return self.micro_batches_per_step * self.train_batch_size

    def steps(self, global_micro_batches: int, max_steps: int, num_epochs: float) -> tuple[int, int]:
        """Optimizer steps per epoch of ``global_micro_batches``, and in the run: ``max_steps`` if set, else
        ``num_epochs`` epochs (at least one step)."""
        per_epoch = global_micro_batches // self.micro_batches_per_step
        return per_epoch, max_steps if max_steps > 0 else max(1, math.ceil(num_epochs * per_epoch))

    def samplers(self, train_lengths: Sequence[int], eval_lengths: Sequence[int], eval_batch_size: int,
                 seed: int) -> "tuple[LengthGroupedBatchSampler, LengthGroupedBatchSampler]":
        """This rank's training and evaluation batch samplers. Training batches are grouped by length and
        shuffled, each epoch padded to whole optimizer steps; every rank evaluates the same number of
        batches (FSDP needs it): a rank short of one repeats a batch and leaves it out of the sums."""
        from ..data import LengthGroupedBatchSampler

        ranks = dict(num_replicas=self.world_size, rank=self.rank)
        return (LengthGroupedBatchSampler(train_lengths, self.train_batch_size, seed=seed,
                                          step_multiple=self.micro_batches_per_step, **ranks),
                LengthGroupedBatchSampler(eval_lengths, eval_batch_size, shuffle=False, **ranks))

    def change(self, gradient_accumulation_steps: int) -> str:
        """For the resume's log line: how the ranks and accumulation changed from the checkpoint's ("" if not)."""
        if self.saved_world_size is None:
            return ""
        saved_accumulation = self.micro_batches_per_step // self.saved_world_size
        if self.saved_world_size == self.world_size and saved_accumulation == gradient_accumulation_steps:
            return ""
        return (f"; saved by {self.saved_world_size} rank(s) x {saved_accumulation} accumulation, continued on "
                f"{self.world_size} rank(s) x {self.accumulation} accumulation: the same global batch of "
                f"{self.micro_batches_per_step} micro-batches")
