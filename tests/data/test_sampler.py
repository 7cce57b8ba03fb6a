"""Length-grouped batching: determinism, exact mid-epoch resume, sharding, padding waste."""

from __future__ import annotations

import random

import pytest

from dylora_moe.data.collate import padding_waste
from dylora_moe.data.sampler import LengthGroupedBatchSampler


@pytest.fixture(scope="module")
def lengths():
    rng = random.Random(0)
    return [rng.randint(20, 600) for _ in range(1003)]


def flat(batches):
    return [i for b in batches for i in b]


def test_every_example_once_per_epoch(lengths):
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1)
    batches = list(sampler)
    assert sorted(flat(batches)) == list(range(len(lengths)))
    assert len(batches) == len(sampler) == sampler.num_batches == 126
    assert sum(len(b) < 8 for b in batches) == 1


def test_same_seed_and_epoch_same_order(lengths):
    a = LengthGroupedBatchSampler(lengths, 8, seed=1)
    b = LengthGroupedBatchSampler(lengths, 8, seed=1)
    assert list(a) == list(b)
    a.set_epoch(3)
    b.set_epoch(3)
    epoch3 = list(a)
    assert epoch3 == list(b)
    b.set_epoch(4)
    assert list(b) != epoch3
    assert list(LengthGroupedBatchSampler(lengths, 8, seed=2)) != list(LengthGroupedBatchSampler(lengths, 8, seed=1))


def test_resume_mid_epoch_is_exact(lengths):
    reference = LengthGroupedBatchSampler(lengths, 8, seed=5)
    reference.set_epoch(2)
    full = list(reference)
    resumed = LengthGroupedBatchSampler(lengths, 8, seed=5)
    resumed.set_epoch(2, start_batch=57)
    assert len(resumed) == len(full) - 57
    assert list(resumed) == full[57:]
    # The resume applies to one pass only: the next iteration is a whole epoch again.
    assert list(resumed) == full
    resumed.set_epoch(2, start_batch=len(full))
    assert list(resumed) == []
    with pytest.raises(ValueError):
        resumed.set_epoch(2, start_batch=len(full) + 1)


def test_longest_batch_first_and_batches_length_grouped(lengths):
    batches = list(LengthGroupedBatchSampler(lengths, 8, seed=9))
    assert max(lengths) in [lengths[i] for i in batches[0]]
    grouped = padding_waste(lengths, batches)
    rng = random.Random(9)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    naive = padding_waste(lengths, [order[i:i + 8] for i in range(0, len(order), 8)])
    assert grouped < 0.05 < 0.3 < naive


def test_sharding_by_rank(lengths):
    world = 3
    samplers = [LengthGroupedBatchSampler(lengths, 8, seed=4, num_replicas=world, rank=r) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == samplers[0].num_batches == 42
    everything = flat(flat(per_rank))
    assert set(everything) == set(range(len(lengths)))  # 126 batches: no padding needed
    assert len(everything) == len(lengths)
    # Uneven: the last rank repeats the first batch so every rank steps equally often.
    uneven = [list(LengthGroupedBatchSampler(lengths, 8, seed=4, num_replicas=4, rank=r)) for r in range(4)]
    assert [len(u) for u in uneven] == [32] * 4
    dropping = [list(LengthGroupedBatchSampler(lengths, 8, seed=4, num_replicas=4, rank=r, drop_last=True))
                for r in range(4)]
    assert [len(u) for u in dropping] == [31] * 4 and all(len(b) == 8 for b in flat(dropping))
    with pytest.raises(ValueError):
        LengthGroupedBatchSampler(lengths, 8, num_replicas=2, rank=2)


def test_unshuffled_is_sorted_by_length(lengths):
    batches = list(LengthGroupedBatchSampler(lengths, 16, shuffle=False))
    order = flat(batches)
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)


def test_padding_waste_arithmetic():
    assert padding_waste([4, 2, 3, 3], [[0, 1], [2, 3]]) == pytest.approx(2 / 14)
    assert padding_waste([4, 2], [[0, 1]], pad_to_multiple_of=8) == pytest.approx(10 / 16)
    assert padding_waste([], []) == 0.0
