"""build_datasets end to end: counts, subsets, mixing, errors, and padding waste of the default."""

from __future__ import annotations

import logging
import shutil
from collections import Counter

import pytest

from dylora_moe.data import IGNORE_INDEX, LengthGroupedBatchSampler, PaddingCollator, build_datasets, padding_waste
from dylora_moe.errors import DataError
from tests.data.conftest import FIXTURES


@pytest.fixture(scope="module")
def stdlib(tokenizer):
    return build_datasets(["stdlib_functions"], tokenizer, max_seq_length=512, seed=42)


def test_default_builtin_dataset(stdlib, tokenizer):
    train, evaluation, report = stdlib
    counts = report.datasets["stdlib_functions"]
    assert counts.origin == "builtin" and counts.skipped == 0
    assert counts.loaded == counts.train + counts.validation + counts.dropped
    assert counts.validation == round(counts.loaded * 0.05)
    assert (report.train_size, report.eval_size) == (len(train), len(evaluation))
    assert counts.in_mix == len(train) == counts.train
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels", "length", "source"}
    example = train[0]
    assert example["length"] == len(example["input_ids"]) <= 512
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert example["labels"][0] == IGNORE_INDEX and example["labels"][-1] != IGNORE_INDEX
    assert "stdlib_functions" in report.summary()


def test_train_and_validation_do_not_overlap(stdlib):
    train, evaluation, _ = stdlib
    seen = {tuple(ids) for ids in train["input_ids"]}
    assert len(seen) == len(train)
    assert not seen & {tuple(ids) for ids in evaluation["input_ids"]}


def test_padding_waste_under_ten_percent_with_batch_8(stdlib, tokenizer):
    train, _, _ = stdlib
    lengths = train["length"]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=42)
    waste = padding_waste(lengths, list(sampler))
    print(f"padding waste, stdlib_functions, batch 8, max_seq_length 512: {waste:.2%}")
    assert waste < 0.10
    # The collator pads exactly as padding_waste counts.
    collate = PaddingCollator.for_tokenizer(tokenizer)
    batches = list(sampler)[:20]
    padded = [collate([train[i] for i in b]) for b in batches]
    pad_tokens = sum((p["attention_mask"] == 0).sum().item() for p in padded)
    all_tokens = sum(p["attention_mask"].numel() for p in padded)
    assert pad_tokens / all_tokens == pytest.approx(padding_waste(lengths, batches))


def test_same_seed_same_datasets(stdlib, tokenizer):
    train, evaluation, _ = build_datasets("stdlib_functions", tokenizer, 512, seed=42)
    assert train["input_ids"] == stdlib[0]["input_ids"]
    assert evaluation["input_ids"] == stdlib[1]["input_ids"]


def test_subsets_take_percentages_of_each_split(tokenizer, datasets_dir):
    train, evaluation, report = build_datasets(
        ["mbpp"], tokenizer, 256, data_dir=datasets_dir, training_subset=10, eval_subset=50)
    counts = report.datasets["mbpp"]
    assert counts.loaded == 374
    assert (counts.train, counts.validation) == (36, 10)  # ceil(355 * 10%), ceil(19 * 50%)
    assert (len(train), len(evaluation)) == (36, 10)


def test_interleave_balances_three_datasets_of_different_sizes(tokenizer, datasets_dir, tmp_path, caplog):
    shutil.copy(FIXTURES / "code_feedback.jsonl", tmp_path)
    for name in ("code_alpaca_2k.json", "mbpp.jsonl"):
        (tmp_path / name).symlink_to(datasets_dir / name)
    names = ["code_alpaca", "mbpp", "code_feedback"]
    with caplog.at_level(logging.INFO, logger="dylora_moe.data"):
        train, evaluation, report = build_datasets(
            names, tokenizer, 256, data_dir=tmp_path, mixing="interleave", validation_fraction=0.2)
    sizes = [report.datasets[n].train for n in names]
    assert sizes[0] > 4 * sizes[1] > 40 * sizes[2]
    assert len(train) == sum(sizes)
    counts = Counter(train["source"])
    assert max(counts.values()) - min(counts.values()) <= 1
    assert {n: report.datasets[n].in_mix for n in names} == {n: counts[n] for n in names}
    # Evaluation keeps every validation example once, unmixed.
    assert Counter(evaluation["source"]) == {n: report.datasets[n].validation for n in names}
    assert any("code_alpaca: " in r.message and "skipped" in r.message for r in caplog.records)


def test_weights_string(tokenizer, tmp_path):
    shutil.copy(FIXTURES / "python_codes_25k.json", tmp_path)
    shutil.copy(FIXTURES / "code_feedback.jsonl", tmp_path)
    train, _, report = build_datasets(
        "python_codes_25k,code_feedback", tokenizer, 128, data_dir=tmp_path,
        validation_fraction=0, mixing="python_codes_25k:3,code_feedback:1")
    counts = Counter(train["source"])
    assert len(train) == 8 and counts == {"python_codes_25k": 6, "code_feedback": 2}
    assert report.mixing == "python_codes_25k:3,code_feedback:1" and report.eval_size == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"training_subset": 0}, "training_subset 0 is not a valid percentage"),
    ({"eval_subset": 101}, "eval_subset 101 is not a valid percentage"),
    ({"validation_fraction": 1.0}, "validation_fraction 1.0 is not accepted"),
    ({"mixing": "stdlib_functions:-2"}, "the weight '-2'"),
    ({"mixing": "mbpp:1"}, "'mbpp', which is not among the datasets"),
    ({"names": []}, "No dataset given"),
    ({"names": ["mbpp", "mbpp"]}, "mbpp listed more than once"),
    ({"names": ["humaneval"]}, "evaluation benchmark"),
    ({"names": ["no_such_set"]}, "Known datasets: stdlib_functions, code_alpaca, mbpp"),
    ({"max_seq_length": 8}, "max_seq_length 8 is too small"),
])
def test_bad_options_are_data_errors(tokenizer, monkeypatch, kwargs, message):
    from dylora_moe.data import registry

    def must_not_load(*args, **kwargs):
        raise AssertionError("options must be checked before loading")

    if "names" not in kwargs or kwargs["names"] == ["mbpp", "mbpp"]:
        monkeypatch.setattr(registry, "load_records", must_not_load)
        monkeypatch.setattr("dylora_moe.data.build.load_records", must_not_load)
    arguments = {"names": ["stdlib_functions"], "tokenizer": tokenizer, "max_seq_length": 128, **kwargs}
    with pytest.raises(DataError) as err:
        build_datasets(**arguments)
    assert message in str(err.value)


def test_empty_dataset_is_an_error(tokenizer):
    with pytest.raises(DataError, match="'all_bad' .* has no usable records"):
        build_datasets([str(FIXTURES / "all_bad.jsonl")], tokenizer, 128)
