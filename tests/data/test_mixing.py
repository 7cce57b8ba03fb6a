"""Seeded splits, subset percentages, weights parsing and balanced/weighted mixing."""

from __future__ import annotations

from collections import Counter

import pytest

from dylora_moe.data.mixing import Mixing, mix_indices, parse_mixing, quotas, split_indices, take_percent
from dylora_moe.errors import DataError


def test_split_is_disjoint_complete_and_seeded():
    train, val = split_indices(1000, 0.05, seed=7, name="a")
    assert len(val) == 50 and len(train) == 950
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
    assert split_indices(1000, 0.05, seed=7, name="a") == (train, val)
    assert split_indices(1000, 0.05, seed=8, name="a")[1] != val
    assert split_indices(1000, 0.05, seed=7, name="b")[1] != val  # per-dataset seeds


def test_split_keeps_at_least_one_on_each_side():
    assert [len(x) for x in split_indices(3, 0.01, 0)] == [2, 1]
    assert [len(x) for x in split_indices(2, 0.9, 0)] == [1, 1]
    assert split_indices(5, 0.0, 0)[1] == []
    with pytest.raises(DataError, match="'tiny' has 1 usable example"):
        split_indices(1, 0.05, 0, "tiny")


@pytest.mark.parametrize("fraction", [-0.1, 1, 1.5, "0.1", True])
def test_bad_validation_fraction(fraction):
    with pytest.raises(DataError, match=f"validation_fraction {fraction!r} is not accepted"):
        split_indices(10, fraction, 0)


def test_take_percent_is_a_nested_prefix():
    order = list(range(100, 300))
    assert take_percent(order, 10) == order[:20]
    assert take_percent(order, 100) == order
    assert take_percent(order, 0.1) == order[:1]  # at least one example
    assert take_percent([], 50) == []
    assert take_percent(order, 35)[:20] == take_percent(order, 10)


@pytest.mark.parametrize("value", [0, 101, -5, 100.5, "50", None])
def test_bad_subset_percent(value):
    with pytest.raises(DataError) as err:
        take_percent([1, 2, 3], value, "training_subset")
    message = str(err.value)
    assert f"training_subset {value!r} is not a valid percentage" in message
    assert "greater than 0 and at most 100" in message


def test_parse_modes_and_weights():
    names = ["code_alpaca", "mbpp", "evol_instruct"]
    assert parse_mixing("concat", names) == Mixing("concat", None)
    assert parse_mixing(None, names) == Mixing("concat", None)
    assert parse_mixing("Interleave", names) == Mixing("interleave", dict.fromkeys(names, 1.0))
    assert parse_mixing(" code_alpaca:2, mbpp:0.5 ,evol_instruct:0", names) == Mixing(
        "weights", {"code_alpaca": 2.0, "mbpp": 0.5, "evol_instruct": 0.0})


@pytest.mark.parametrize("text, expected", [
    ("code_alpaca=2,mbpp:1", "bad entry 'code_alpaca=2'"),
    ("code_alpaca:,mbpp:1", "bad entry 'code_alpaca:'"),
    ("code_alpaca:1:2,mbpp:1", "bad entry 'code_alpaca:1:2'"),
    ("code_alpaca:-1,mbpp:1", "the weight '-1'; weights must be finite numbers >= 0"),
    ("code_alpaca:abc,mbpp:1", "weight 'abc'"),
    ("code_alpaca:inf,mbpp:1", "weight 'inf'"),
    ("code_alpaca:1,mbpp:1,humaneval:1", "dataset 'humaneval', which is not among the datasets"),
    ("code_alpaca:1,code_alpaca:2,mbpp:1", "gives dataset 'code_alpaca' twice"),
    ("code_alpaca:1", "gives no weight to mbpp"),
    ("code_alpaca:0,mbpp:0", "every dataset weight 0"),
    ("shuffle", "bad entry 'shuffle'"),
])
def test_bad_weights(text, expected):
    with pytest.raises(DataError, match="(?i)accepted are|at least one weight") as err:
        parse_mixing(text, ["code_alpaca", "mbpp"])
    assert expected in str(err.value)
    assert repr(text) in str(err.value)


def test_quotas_sum_to_total():
    assert quotas([10, 10, 10], [1, 1, 1], 100) == [34, 33, 33]
    assert quotas([5, 5], [1, 0], 10) == [10, 0]
    assert sum(quotas([7, 300, 5000], [3, 2, 1], 5307)) == 5307


def test_concat_uses_every_example_once():
    pairs = mix_indices([3, 2], Mixing("concat"), ["a", "b"], seed=0)
    assert pairs == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_interleave_is_balanced_for_datasets_of_different_sizes():
    sizes, names = [30, 300, 3000], ["small", "medium", "large"]
    pairs = mix_indices(sizes, parse_mixing("interleave", names), names, seed=3)
    assert len(pairs) == sum(sizes)
    counts = Counter(d for d, _ in pairs)
    assert max(counts.values()) - min(counts.values()) <= 1
    # Balanced all along the epoch, not just in total: every tenth has each within 15% of a third.
    tenth = len(pairs) // 10
    for k in range(10):
        window = Counter(d for d, _ in pairs[k * tenth:(k + 1) * tenth])
        for d in range(3):
            assert abs(window[d] / tenth - 1 / 3) < 0.05, (k, window)
    # The small set is repeated in whole passes: every example 36 or 37 times.
    small = Counter(i for d, i in pairs if d == 0)
    assert set(small) == set(range(30)) and set(small.values()) <= {36, 37}
    # The large set is subsampled without repeats.
    large = [i for d, i in pairs if d == 2]
    assert len(large) == len(set(large))


def test_weights_give_proportions_and_are_seeded():
    names = ["a", "b", "c"]
    mixing = parse_mixing("a:1,b:2,c:1", names)
    pairs = mix_indices([100, 100, 1000], mixing, names, seed=1)
    counts = Counter(d for d, _ in pairs)
    assert [counts[d] for d in range(3)] == [300, 600, 300]
    assert mix_indices([100, 100, 1000], mixing, names, seed=1) == pairs
    assert mix_indices([100, 100, 1000], mixing, names, seed=2) != pairs
