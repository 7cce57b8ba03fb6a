"""Seeded train/validation splits, subsets, and mixing several datasets into one training set.

All functions work on index lists, so they are cheap for any dataset size and exactly
reproducible: the same seed and dataset name give the same split on every machine, and adding a
dataset to a run does not change the split of the others (each dataset's seed is derived from the
run seed and its name).

Mixing (``mixing`` argument of :func:`dylora_moe.data.build.build_datasets`):

- ``"concat"``: every training example once; datasets contribute in proportion to their size.
- ``"interleave"``: balanced, every dataset contributes the same number of examples.
- ``"name:weight,name:weight"``: dataset *i* contributes a share ``weight_i / sum(weights)``.

Balanced and weighted mixes are done by our own seeded sampler, not
``datasets.interleave_datasets``: an epoch keeps the size of the concatenation (the sum of the
training sets, so ``interleave`` does not multiply the epoch as ``all_exhausted`` would, nor cut
it to the smallest set as ``first_exhausted`` would); each dataset's quota is rounded by largest
remainders; a dataset smaller than its quota is repeated in whole reshuffled passes before a
partial pass (its examples are used equally often, give or take one), and a larger one is
subsampled without repeats. The result is shuffled, so any stretch of the epoch is mixed too.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

from ..errors import DataError

MIXING_MODES = ("concat", "interleave")


def derive_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed from ``seed`` and ``parts`` that is stable across processes and machines."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def check_fraction(validation_fraction: float) -> float:
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, Real) \
            or not 0 <= validation_fraction < 1:
        raise DataError(
            f"validation_fraction {validation_fraction!r} is not accepted: give a number from 0 "
            f"(no validation set) up to but excluding 1, e.g. 0.05 for 5%."
        )
    return float(validation_fraction)


def check_percent(value: float, option: str) -> float:
    """``value`` if it is a percentage in (0, 100], else a DataError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 100:
        raise DataError(
            f"{option} {value!r} is not a valid percentage: give a number greater than 0 and at "
            f"most 100 (e.g. 10 to use 10% of the examples, 100 for all of them)."
        )
    return float(value)


def split_indices(
    n: int, validation_fraction: float, seed: int, name: str = ""
) -> tuple[list[int], list[int]]:
    """Disjoint shuffled (train, validation) index lists covering ``range(n)``.

    The validation set has ``round(n * fraction)`` examples, but at least 1 when the fraction is
    positive, and the training set keeps at least 1.
    """
    fraction = check_fraction(validation_fraction)
    order = list(range(n))
    random.Random(derive_seed(seed, "split", name)).shuffle(order)
    if fraction == 0:
        return order, []
    if n < 2:
        raise DataError(
            f"Dataset {name!r} has {n} usable example(s), too few to split off a validation set; "
            f"give at least 2 examples or set validation_fraction to 0."
        )
    n_val = min(max(1, round(n * fraction)), n - 1)
    return order[n_val:], order[:n_val]


def take_percent(indices: Sequence[int], percent: float, option: str = "subset") -> list[int]:
    """The first ``percent``% of ``indices`` (at least one when there are any).

    ``indices`` are already shuffled, so this is a random subset, and a smaller percentage gives
    a prefix of a larger one.
    """
    percent = check_percent(percent, option)
    if not indices:
        return []
    return list(indices[: max(1, math.ceil(len(indices) * percent / 100 - 1e-9))])


@dataclass(frozen=True)
class Mixing:
    """A parsed mixing: ``weights`` is None for concatenation, else one weight per dataset."""

    mode: str  # "concat", "interleave" or "weights"
    weights: dict[str, float] | None = None


def split_weighted_names(spec: str) -> tuple[list[str], str | None]:
    """``"a:2,b:1"`` -> (["a", "b"], "a:2,b:1"); ``"a,b"`` -> (["a", "b"], None).

    ``--datasets`` may carry mixing weights; the names are what precedes each ``:``. The weights
    themselves are checked by :func:`parse_mixing`.
    """
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not any(":" in e for e in entries):
        return entries, None
    return [e.partition(":")[0].strip() for e in entries], ",".join(entries)


def parse_mixing(mixing: str | None, names: Sequence[str]) -> Mixing:
    """Parse ``"concat"``, ``"interleave"`` or ``"name:weight,..."`` for the datasets ``names``."""
    text = (mixing or "concat").strip()
    if text.lower() in MIXING_MODES:
        mode = text.lower()
        return Mixing(mode, None if mode == "concat" else {n: 1.0 for n in names})

    accepted = (f'"concat", "interleave", or weights like "{names[0] if names else "name"}:2,'
                f'..." naming each of the datasets ({", ".join(names)}) once with a number >= 0')
    weights: dict[str, float] = {}
    for entry in text.split(","):
        name, sep, value = (part.strip() for part in entry.partition(":"))
        if not sep or not name or not value or ":" in value:
            raise DataError(f"Mixing {mixing!r} has a bad entry {entry.strip()!r}: accepted are "
                            f"{accepted}.")
        if name not in names:
            raise DataError(
                f"Mixing {mixing!r} weights dataset {name!r}, which is not among the datasets "
                f"being trained on ({', '.join(names)}); accepted are {accepted}.")
        if name in weights:
            raise DataError(
                f"Mixing {mixing!r} gives dataset {name!r} twice; accepted are {accepted}.")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise DataError(f"Mixing {mixing!r} gives dataset {name!r} the weight {value!r}; "
                            f"weights must be finite numbers >= 0. Accepted are {accepted}.")
        weights[name] = weight
    missing = [n for n in names if n not in weights]
    if missing:
        raise DataError(f"Mixing {mixing!r} gives no weight to {', '.join(missing)}; accepted are "
                        f"{accepted}.")
    if not any(weights.values()):
        raise DataError(f"Mixing {mixing!r} gives every dataset weight 0; at least one weight "
                        f"must be positive.")
    return Mixing("weights", weights)


def quotas(sizes: Sequence[int], weights: Sequence[float], total: int) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights``, by largest remainders.

    They sum to ``total``, except that a dataset with a positive weight gets at least one
    example even when its share rounds to 0.
    """
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    # A positive-weight dataset is never starved by rounding, and an empty one gets nothing.
    return [0 if size == 0 else max(count, 1 if weight > 0 else 0)
            for size, count, weight in zip(sizes, counts, weights)]


def draw(size: int, count: int, seed: int) -> list[int]:
    """``count`` indices into ``range(size)``: whole reshuffled passes, then a partial one."""
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < count:
        order = list(range(size))
        rng.shuffle(order)
        out.extend(order[: count - len(out)])
    return out


def mix_indices(
    sizes: Sequence[int], mixing: Mixing, names: Sequence[str], seed: int
) -> list[tuple[int, int]]:
    """(dataset number, index within it) pairs of one training epoch under ``mixing``."""
    if mixing.weights is None:
        return [(d, i) for d, size in enumerate(sizes) for i in range(size)]
    counts = quotas(sizes, [mixing.weights[n] for n in names], sum(sizes))
    pairs = [(d, i) for d, (size, count, name) in enumerate(zip(sizes, counts, names))
             for i in draw(size, count, derive_seed(seed, "mix", name))]
    random.Random(derive_seed(seed, "mix-order")).shuffle(pairs)
    return pairs
