"""Length-grouped, seeded, resumable batching.

:class:`LengthGroupedBatchSampler` yields lists of example indices (use it as a DataLoader's
``batch_sampler``). For epoch *e* it shuffles all indices with a seed derived from ``(seed, e)``,
cuts the permutation into mega-batches of ``mega_batch_mult * batch_size``, sorts each mega-batch
by length, cuts it into batches and shuffles the batches, moving the batch holding the longest
example to the front so an out-of-memory shows at the first step. Examples of a batch thus have
similar lengths and padding stays small, while the order still changes every epoch (the method of
Hugging Face's ``LengthGroupedSampler``, plus the batch shuffle).

Resuming is exact and costs no data access: the order depends only on ``(seed, epoch)`` and the
lengths, so ``set_epoch(epoch, start_batch=k)`` makes the next iteration begin at the *k*-th batch
of that epoch (for this rank).

Under ``torch.distributed`` give ``num_replicas`` (world size), ``rank`` and ``step_multiple``
(micro-batches per optimizer step over all ranks: world size x accumulation). Every rank computes
the same global batch list, padded by repeating its first batches (or, with ``drop_last``, cut)
to a whole number of optimizer steps, and takes every ``num_replicas``-th batch. Optimizer step
*k* therefore consumes global batches ``k*step_multiple .. (k+1)*step_multiple - 1`` whatever the
world size: a run resumed on another number of ranks, with the accumulation recomputed to keep
``step_multiple``, sees the same examples at every later step.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from .mixing import derive_seed


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar-length examples in a seeded order; see the module docstring."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        mega_batch_mult: int | None = None,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        step_multiple: int | None = None,
    ):
        """``lengths[i]`` is example *i*'s token count; ``shuffle=False`` gives a fixed order
        sorted by length (for evaluation). ``mega_batch_mult`` defaults, as in Hugging Face, to
        ``min(len // (4 * batch_size), 50)`` and at least 1."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        step_multiple = step_multiple or num_replicas
        if step_multiple % num_replicas:
            raise ValueError(f"step_multiple {step_multiple} is not a multiple of num_replicas {num_replicas}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        default_mult = max(1, min(len(self.lengths) // (4 * batch_size), 50))
        self.mega_batch_mult = mega_batch_mult or default_mult
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.step_multiple = step_multiple
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration yield epoch ``epoch`` from its ``start_batch``-th batch on."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.num_batches}")
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` over every rank, before the per-rank split."""
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            order.sort(key=lambda i: (-self.lengths[i], i))
            batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        else:
            rng = random.Random(derive_seed(self.seed, "batches", epoch))
            rng.shuffle(order)
            mega = self.mega_batch_mult * self.batch_size
            batches = []
            for start in range(0, len(order), mega):
                group = sorted(order[start: start + mega], key=lambda i: -self.lengths[i])
                batches += [group[i: i + self.batch_size]
                            for i in range(0, len(group), self.batch_size)]
            rng.shuffle(batches)
            if batches:
                longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
                batches[0], batches[longest] = batches[longest], batches[0]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, all of them."""
        batches = self.global_batches(epoch)
        multiple = self.step_multiple
        if multiple > 1 and batches and len(batches) % multiple:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % multiple]
            else:
                extra = multiple - len(batches) % multiple
                batches = batches + [batches[i % len(batches)] for i in range(extra)]
        return batches[self.rank:: self.num_replicas]

    @property
    def unpadded_num_batches(self) -> int:
        """Batches per epoch over every rank before padding (or cutting) to whole optimizer steps."""
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def global_num_batches(self) -> int:
        """Batches per epoch over every rank, padding included (a whole number of optimizer steps)."""
        total, multiple = self.unpadded_num_batches, self.step_multiple
        return total // multiple * multiple if self.drop_last else -(-total // multiple) * multiple

    @property
    def num_batches(self) -> int:
        """Batches per epoch for this rank, the same for every epoch.

        Mega-batches are whole multiples of ``batch_size``, so only the last one can leave a
        short batch, exactly as without shuffling.
        """
        return self.global_num_batches // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches(self.epoch)
        start, self.start_batch = self.start_batch, 0  # a resume applies to one iteration only
        yield from batches[start:]

    def __len__(self) -> int:
        """Batches the next iteration yields (the whole epoch unless resuming mid-epoch)."""
        return self.num_batches - self.start_batch
