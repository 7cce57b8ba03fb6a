"""Training data: named datasets, the built-in set, the prompt template, mixing and batching.

The public API::

    build_datasets(names, tokenizer, max_seq_length, data_dir=None, seed=42,
                   validation_fraction=0.05, training_subset=100, eval_subset=100,
                   mixing="concat") -> (train, eval, DataReport)
    DEFAULT_DATASETS = ("stdlib_functions",)       # the built-in set, needs no files
    load_records(name, data_dir=None, mbpp_first_test=True) -> (records, LoadStats)
    known_names() -> list[str]
    format_prompt(instruction, input="") -> str     # the prompt generation must use too
    LengthGroupedBatchSampler(lengths, batch_size, seed=0, shuffle=True, mega_batch_mult=None,
                              drop_last=False, num_replicas=1, rank=0)
        .set_epoch(epoch, start_batch=0)            # exact mid-epoch resume, nothing replayed
    PaddingCollator.for_tokenizer(tokenizer)(examples) -> {input_ids, attention_mask, labels}
    padding_waste(lengths, batches) -> float

``records`` is a ``datasets.Dataset`` of {instruction, input, output, source}; ``train`` and
``eval`` are ``datasets.Dataset`` of {input_ids, attention_mask, labels, length, source}.
Errors are :class:`dylora_moe.errors.DataError`. Files: ``registry.py`` (names, hub ids, offline
files, loading), ``schemas.py`` (row -> record), ``builtin.py`` (``stdlib_functions``),
``template.py`` (prompt, tokenisation, label masking), ``mixing.py`` (split, subsets, mixing),
``sampler.py`` (length-grouped resumable batches), ``collate.py`` (padding), ``build.py``.
"""

import importlib

# Imported lazily so that ``dylora_moe.data.stdlib_split`` (used by model pretraining scripts)
# does not pull in ``datasets`` and ``torch``.
_EXPORTS = {
    "DataReport": "build", "DatasetCounts": "build", "build_datasets": "build",
    "DEFAULT_DATASETS": "build",
    "PaddingCollator": "collate", "padding_waste": "collate",
    "REGISTRY": "registry", "LoadStats": "registry", "known_names": "registry",
    "load_records": "registry",
    "LengthGroupedBatchSampler": "sampler",
    "IGNORE_INDEX": "template", "format_prompt": "template",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_DATASETS",
    "IGNORE_INDEX",
    "REGISTRY",
    "DataReport",
    "DatasetCounts",
    "LengthGroupedBatchSampler",
    "LoadStats",
    "PaddingCollator",
    "build_datasets",
    "format_prompt",
    "known_names",
    "load_records",
    "padding_waste",
]
