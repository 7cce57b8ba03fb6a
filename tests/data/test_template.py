"""Prompt template, tokenisation and label masking (loss on response tokens only)."""

from __future__ import annotations

import pytest

from dylora_moe.data.collate import PaddingCollator
from dylora_moe.data.template import IGNORE_INDEX, ExampleTokenizer, format_prompt, tokenize_example
from dylora_moe.errors import DataError

RECORD = {
    "instruction": "Return the larger of two numbers.",
    "input": "def larger(a, b):",
    "output": "def larger(a, b):\n    return a if a > b else b",
    "source": "test",
}


def test_format_prompt_with_and_without_input():
    assert format_prompt("Do X.", "ctx") == "### Instruction:\nDo X.\n\n### Input:\nctx\n\n### Response:\n"
    assert format_prompt("Do X.") == "### Instruction:\nDo X.\n\n### Response:\n"
    assert format_prompt("Do X.", "  \n") == format_prompt("Do X.")


def test_labels_mask_exactly_the_prompt(tokenizer):
    example = tokenize_example(tokenizer, RECORD, max_seq_length=256)
    prompt = [tokenizer.bos_token_id] + tokenizer(
        format_prompt(RECORD["instruction"], RECORD["input"]), add_special_tokens=False)["input_ids"]
    response = tokenizer(RECORD["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    p = len(prompt)
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [IGNORE_INDEX] * p + response
    assert example["attention_mask"] == [1] * (p + len(response))
    assert example["length"] == p + len(response) and example["truncated"] is False
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert example["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"][p:-1]) == RECORD["output"]


def test_collator_pads_with_ignored_labels(tokenizer):
    short = tokenize_example(tokenizer, {**RECORD, "input": ""}, 256)
    long = tokenize_example(tokenizer, {**RECORD, "output": RECORD["output"] * 3}, 256)
    batch = PaddingCollator.for_tokenizer(tokenizer)([short, long])
    n_short, n_long = len(short["input_ids"]), len(long["input_ids"])
    assert batch["input_ids"].shape == (2, n_long)
    assert batch["input_ids"][0, n_short:].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    labels = batch["labels"].tolist()
    assert labels[0] == short["labels"] + [IGNORE_INDEX] * (n_long - n_short)
    assert labels[1] == long["labels"]
    # Exactly the response tokens (and their EOS) are counted by the loss.
    counted = (batch["labels"] != IGNORE_INDEX).sum().item()
    assert counted == sum(label != IGNORE_INDEX for label in short["labels"] + long["labels"])


def test_pad_to_multiple_of(tokenizer):
    example = tokenize_example(tokenizer, RECORD, 256)
    batch = PaddingCollator.for_tokenizer(tokenizer, pad_to_multiple_of=64)([example])
    assert batch["input_ids"].shape[1] == 64 * -(-len(example["input_ids"]) // 64)


def test_long_prompt_is_cut_in_the_middle_and_response_kept(tokenizer):
    record = {**RECORD, "input": "x = [" + ", ".join(str(i) for i in range(400)) + "]"}
    example = tokenize_example(tokenizer, record, max_seq_length=64)
    response = tokenizer(RECORD["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["length"] == 64 and example["truncated"] is True
    assert example["input_ids"][-len(response):] == response  # whole response, EOS included
    p = 64 - len(response)
    assert example["labels"] == [IGNORE_INDEX] * p + response
    prompt_text = tokenizer.decode(example["input_ids"][1:p])
    assert prompt_text.startswith("### Instruction:\nReturn the larger")
    assert prompt_text.endswith("\n\n### Response:\n")


def test_long_response_keeps_prompt_and_is_cut_on_the_right(tokenizer):
    record = {**RECORD, "output": "\n".join(f"x{i} = {i}" for i in range(300))}
    example = tokenize_example(tokenizer, record, max_seq_length=128)
    prompt = [tokenizer.bos_token_id] + tokenizer(
        format_prompt(RECORD["instruction"], RECORD["input"]), add_special_tokens=False)["input_ids"]
    assert len(prompt) < 64  # fits in its half, so it is kept whole
    assert example["length"] == 128
    assert example["input_ids"][: len(prompt)] == prompt
    assert example["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert all(label != IGNORE_INDEX for label in example["labels"][len(prompt):])
    assert example["labels"][-1] != tokenizer.eos_token_id  # cut before the end


def test_huge_prompt_and_response_share_the_window(tokenizer):
    record = {"instruction": "word " * 500, "input": "", "output": "code " * 500}
    example = tokenize_example(tokenizer, record, max_seq_length=100)
    labelled = sum(label != IGNORE_INDEX for label in example["labels"])
    assert example["length"] == 100 and labelled == 50


def test_dropped_when_no_room_for_a_response(tokenizer):
    encoder = ExampleTokenizer(tokenizer, 32)
    prompt = list(range(3, 60))
    example = encoder.tokenize_ids(prompt, [5, 6])
    assert example["input_ids"][-2:] == [5, 6] and example["length"] == 32
    assert example["input_ids"][-2 - encoder.keep_tail: -2] == prompt[-encoder.keep_tail:]
    # A response header too long to fit next to any response: the example is dropped.
    encoder.keep_tail = 40
    assert encoder.tokenize_ids(prompt, [5, 6]) is None


def test_bad_max_seq_length_and_tokenizer(tokenizer):
    with pytest.raises(DataError, match="max_seq_length 4 is too small"):
        ExampleTokenizer(tokenizer, 4)

    class NoEos:
        eos_token_id = None
        name_or_path = "weird"

    with pytest.raises(DataError, match="'weird' has no EOS token"):
        ExampleTokenizer(NoEos(), 128)


def test_tokenizer_without_bos(tokenizer):
    class NoBos:
        def __init__(self, inner):
            self.inner = inner
            self.bos_token_id = None
            self.eos_token_id = inner.eos_token_id

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    example = tokenize_example(NoBos(tokenizer), RECORD, 256)
    with_bos = tokenize_example(tokenizer, RECORD, 256)
    assert example["input_ids"] == with_bos["input_ids"][1:]
