"""Padding a batch to its longest example, and measuring how much of a batching is padding.

:class:`PaddingCollator` pads on the right to the longest example of the batch (optionally to a
multiple of ``pad_to_multiple_of``): ``input_ids`` with the pad id, ``attention_mask`` with 0 and
``labels`` with -100, so padding never reaches the loss. Given ``sources`` (dataset names), it also
gives ``dataset_ids``: each example's ``source`` as its index in that list. Other keys are ignored.

:func:`padding_waste` is the share of padding tokens in all tokens of a batching; with
:class:`~dylora_moe.data.sampler.LengthGroupedBatchSampler` it stays in the low percents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .template import IGNORE_INDEX

PADDED_KEYS = ("input_ids", "attention_mask", "labels")


def _padded_length(longest: int, multiple: int | None) -> int:
    return -(-longest // multiple) * multiple if multiple else longest


class PaddingCollator:
    """``collate(examples) -> {input_ids, attention_mask, labels}`` as long tensors."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None,
                 sources: Sequence[str] | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.source_ids = {name: i for i, name in enumerate(sources)} if sources else None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None,
                      sources: Sequence[str] | None = None) -> PaddingCollator:
        """Pads with the tokenizer's pad token, or its EOS when it has none (as GPT-2 needs)."""
        pad = tokenizer.pad_token_id
        pad = tokenizer.eos_token_id if pad is None else pad
        return cls(pad, pad_to_multiple_of, sources)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = _padded_length(max(len(e["input_ids"]) for e in examples), self.pad_to_multiple_of)
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {key: torch.full((len(examples), width), value, dtype=torch.long)
                 for key, value in fill.items()}
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
        if self.source_ids is not None:
            batch["dataset_ids"] = torch.tensor([self.source_ids[e["source"]] for e in examples], dtype=torch.long)
        return batch


def padding_waste(
    lengths: Sequence[int], batches: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None
) -> float:
    """Padding tokens / all tokens when ``batches`` (index lists) are padded like the collator."""
    total = padding = 0
    for batch in batches:
        if not batch:
            continue
        width = _padded_length(max(lengths[i] for i in batch), pad_to_multiple_of)
        real = sum(lengths[i] for i in batch)
        total += width * len(batch)
        padding += width * len(batch) - real
    return padding / total if total else 0.0
