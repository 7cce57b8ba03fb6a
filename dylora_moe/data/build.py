"""``build_datasets``: from dataset names to tokenised training and evaluation sets.

For each name, in order: load records (:mod:`~dylora_moe.data.registry`), split off a seeded
validation set, take the ``training_subset`` / ``eval_subset`` percentages, tokenise with the
prompt template (:mod:`~dylora_moe.data.template`); then mix the training sets
(:mod:`~dylora_moe.data.mixing`) and concatenate the validation sets. Options are checked before
anything is loaded, so a typo costs no download.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets

from ..errors import DataError
from .mixing import (
    check_fraction,
    check_percent,
    mix_indices,
    parse_mixing,
    split_indices,
    split_weighted_names,
    take_percent,
)
from .registry import load_records
from .template import ExampleTokenizer

log = logging.getLogger(__name__)

DEFAULT_DATASETS = ("stdlib_functions",)
DEFAULT_SEED = 42
DEFAULT_VALIDATION_FRACTION = 0.05


@dataclass
class DatasetCounts:
    """What happened to one dataset's rows, from reading to the mixed training epoch."""

    origin: str
    rows: int  # rows read
    excluded: int  # outside the usable split (MBPP task ids not in 601-974)
    skipped: int  # unusable rows (missing fields, empty instruction or response)
    loaded: int  # usable records
    train: int = 0  # tokenised training examples (after the subset)
    validation: int = 0  # tokenised validation examples (after the subset)
    truncated: int = 0  # examples cut to max_seq_length (train and validation)
    dropped: int = 0  # examples with no room left for a response token
    in_mix: int = 0  # draws of this dataset in one training epoch after mixing


@dataclass
class DataReport:
    mixing: str
    max_seq_length: int
    seed: int
    datasets: dict[str, DatasetCounts] = field(default_factory=dict)
    train_size: int = 0
    eval_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A small table, one line per dataset, for the log and the run summary."""
        def line(name: object, *cells: object) -> str:
            return f"{str(name)[:31]:<32}" + "".join(f"{c:>8}" for c in cells)

        rows = [line(name, c.loaded, c.skipped, c.train, c.validation, c.truncated, c.in_mix)
                for name, c in self.datasets.items()]
        return "\n".join([
            line("dataset", "loaded", "skipped", "train", "valid", "trunc", "in mix"),
            *rows,
            line(f"total ({self.mixing})", "", "", self.train_size, self.eval_size),
        ])


# Fixed column types: every part concatenates with every other, and ids take 4 bytes, not 8.
TOKEN_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "attention_mask": datasets.List(datasets.Value("int8")),
    "labels": datasets.List(datasets.Value("int32")),
    "length": datasets.Value("int32"),
    "source": datasets.Value("string"),
    "truncated": datasets.Value("bool"),
})


def _tokenise(records: datasets.Dataset, indices: list[int], encoder: ExampleTokenizer,
              what: str) -> tuple[datasets.Dataset, int, int]:
    """(tokenised examples, truncated count, dropped count) for ``records[indices]``."""
    tokens = None
    if indices:
        part = records.select(indices)
        tokens = part.map(encoder, batched=True, remove_columns=part.column_names,
                          features=TOKEN_FEATURES, desc=f"tokenising {what}")
    if tokens is None or len(tokens) == 0:  # a map that yields no rows loses its columns
        empty = TOKEN_FEATURES.copy()
        del empty["truncated"]
        return datasets.Dataset.from_dict({c: [] for c in empty}, features=empty), 0, len(indices)
    truncated = sum(tokens["truncated"])
    return tokens.remove_columns("truncated"), truncated, len(indices) - len(tokens)


def build_datasets(
    names: Sequence[str] | str,
    tokenizer: Any,
    max_seq_length: int,
    data_dir: str | os.PathLike | None = None,
    seed: int = DEFAULT_SEED,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    training_subset: float = 100,
    eval_subset: float = 100,
    mixing: str = "concat",
) -> tuple[datasets.Dataset, datasets.Dataset, DataReport]:
    """Tokenised (train, eval) datasets and a :class:`DataReport` for the named datasets.

    ``names``: registry names, ``stdlib_functions`` (the default, :data:`DEFAULT_DATASETS`) or
    file paths, as a list or one comma-separated string as ``--datasets`` gives it. ``tokenizer``:
    the base model's Hugging Face tokenizer (it needs an EOS; its BOS is used when it has one).
    ``mixing``: ``"concat"``, ``"interleave"`` (balanced) or ``"name:weight,..."``; weights given
    in ``names`` itself (``"code_alpaca:2,evol_instruct:1"``, as ``--datasets`` takes them) win.
    ``training_subset`` / ``eval_subset`` are percentages in (0, 100] of each dataset's training /
    validation split; ``validation_fraction`` is the share of each dataset held out (0 for none).

    Both returned datasets have the columns ``input_ids``, ``attention_mask``, ``labels`` (-100 on
    the prompt), ``length`` (tokens) and ``source`` (the dataset's name, for per-dataset metrics);
    batch them with :class:`~dylora_moe.data.sampler.LengthGroupedBatchSampler` over
    ``dataset["length"]`` and :class:`~dylora_moe.data.collate.PaddingCollator`.
    """
    if isinstance(names, str):
        names, weighted = split_weighted_names(names)
        mixing = weighted or mixing
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise DataError("No dataset given: name at least one, e.g. stdlib_functions (the built-in "
                        "set) or code_alpaca, mbpp, or a .json/.jsonl/.parquet file.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            f"Dataset(s) {', '.join(repeated)} listed more than once; list each once and use "
            f"mixing weights (e.g. \"{repeated[0]}:2,...\") to give one more weight.")
    check_fraction(validation_fraction)
    check_percent(training_subset, "training_subset")
    check_percent(eval_subset, "eval_subset")
    mix = parse_mixing(mixing, names)
    encoder = ExampleTokenizer(tokenizer, max_seq_length)

    report = DataReport(mixing=mixing if mix.mode == "weights" else mix.mode,
                        max_seq_length=max_seq_length, seed=seed)
    train_parts, eval_parts = [], []
    for name in names:
        records, stats = load_records(name, data_dir)
        train_idx, val_idx = split_indices(len(records), validation_fraction, seed, name)
        train_idx = take_percent(train_idx, training_subset, "training_subset")
        val_idx = take_percent(val_idx, eval_subset, "eval_subset")
        train, t_trunc, t_drop = _tokenise(records, train_idx, encoder, f"{name} (train)")
        valid, v_trunc, v_drop = _tokenise(records, val_idx, encoder, f"{name} (validation)")
        if len(train) == 0:
            raise DataError(
                f"Dataset {name!r} has no training example left: all {len(train_idx)} were too "
                f"long for max_seq_length {max_seq_length}. Raise max_seq_length or use other data."
            )
        report.datasets[name] = DatasetCounts(
            origin=stats.origin, rows=stats.rows, excluded=stats.excluded, skipped=stats.skipped,
            loaded=stats.loaded, train=len(train), validation=len(valid),
            truncated=t_trunc + v_trunc, dropped=t_drop + v_drop)
        train_parts.append(train)
        eval_parts.append(valid)

    sizes = [len(t) for t in train_parts]
    train = datasets.concatenate_datasets(train_parts) if len(train_parts) > 1 else train_parts[0]
    pairs = mix_indices(sizes, mix, names, seed)
    for name in names:
        report.datasets[name].in_mix = 0
    for d, _ in pairs:
        report.datasets[names[d]].in_mix += 1
    if mix.weights is not None:
        offsets = [sum(sizes[:d]) for d in range(len(sizes))]
        train = train.select([offsets[d] + i for d, i in pairs])

    non_empty = [v for v in eval_parts if len(v)]
    evaluation = (datasets.concatenate_datasets(non_empty) if len(non_empty) > 1
                  else non_empty[0] if non_empty else eval_parts[0])
    report.train_size, report.eval_size = len(train), len(evaluation)
    for name, c in report.datasets.items():
        log.info("%s: %d loaded, %d skipped, %d excluded, %d train (%d in the %s mix), "
                 "%d validation, %d truncated, %d dropped", name, c.loaded, c.skipped, c.excluded,
                 c.train, c.in_mix, report.mixing, c.validation, c.truncated, c.dropped)
    return train, evaluation, report
