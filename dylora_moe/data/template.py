"""The prompt template and the tokenisation that masks everything but the response.

The template is Alpaca's section layout without its preamble sentence (which costs ~25 tokens of
a small model's context and teaches nothing)::

    ### Instruction:
    {instruction}

    ### Input:          <- only when the record has an input
    {input}

    ### Response:
    {output}<eos>

:func:`format_prompt` is what generation must use too, so evaluation prompts match training.

:class:`ExampleTokenizer` (batched, for ``Dataset.map``) and :func:`tokenize_example` (one
record) give ``input_ids``, ``attention_mask``, ``labels`` and ``length``; labels are ``-100`` on
the prompt (and on the tokenizer's BOS, prepended when it has one) so the loss counts the response
and its EOS only. Prompt and response are tokenised separately, so the prompt tokens are exactly
those of ``format_prompt`` at generation time. Padding is the collator's job
(:mod:`dylora_moe.data.collate`).

Truncation to ``max_seq_length`` keeps the response: the prompt is cut first, and only down to
half the window when the response needs more; the cut removes the middle of the prompt, keeping
its beginning and the whole ``### Response:`` tail. The response is then cut on the right (its
EOS may go), so it always keeps at least half the window. An example whose prompt cannot shrink
that far (a window too small for BOS, a token of instruction and the response header) would have
no response left and is dropped (``None``); with usual lengths this does not happen.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import DataError

IGNORE_INDEX = -100

RESPONSE_HEADER = "### Response:\n"

# ``Dataset.map`` caches by a hash of the function's state, which names this class but does not
# include its code: the digest of this file in that state makes an edited template re-tokenise.
_CODE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the schema's name
    """The prompt for one example, ending where the model's response starts."""
    sections = [f"### Instruction:\n{instruction.strip()}"]
    if input and input.strip():
        sections.append(f"### Input:\n{input.strip()}")
    sections.append(RESPONSE_HEADER)
    return "\n\n".join(sections)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _cut_prompt(prompt: list[int], budget: int, keep_tail: int, keep_head: int) -> list[int] | None:
    """``prompt`` cut to ``budget`` tokens by removing its middle, keeping at least ``keep_head``
    leading and exactly ``keep_tail`` trailing tokens; None when the budget cannot hold those."""
    if len(prompt) <= budget:
        return prompt
    if budget < keep_head + keep_tail:
        return None
    return prompt[: budget - keep_tail] + prompt[-keep_tail:]


class ExampleTokenizer:
    """Tokenises records with a Hugging Face tokenizer (stateless, so ``Dataset.map`` can cache).

    Each output row has ``input_ids``, ``attention_mask``, ``labels``, ``length``, ``source``
    and ``truncated`` (a flag the caller counts and removes); dropped examples are absent.
    """

    def __init__(self, tokenizer: Any, max_seq_length: int):
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) \
                or max_seq_length < 16:
            raise DataError(
                f"max_seq_length {max_seq_length!r} is too small: it must be an integer of at "
                f"least 16 tokens to hold a prompt header and a response (512-2048 is usual)."
            )
        if tokenizer.eos_token_id is None:
            raise DataError(
                f"The tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token, so "
                f"responses cannot be terminated. Use a tokenizer with an eos_token or set one."
            )
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        # The prompt's end ("### Response:\n") must survive a cut, or the model never sees it.
        self.keep_tail = len(_encode(tokenizer, ["\n\n" + RESPONSE_HEADER])[0])
        self.code_digest = _CODE_DIGEST

    def __call__(self, batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        """``Dataset.map(batched=True)`` function: record columns in, token columns out.

        Dropped examples are simply absent from the output, so the batch may shrink.
        """
        prompts = _encode(self.tokenizer, [format_prompt(i, x) for i, x in
                                           zip(batch["instruction"], batch["input"])])
        responses = _encode(self.tokenizer, batch["output"])
        sources = batch.get("source") or [""] * len(responses)
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": [],
                                     "length": [], "truncated": [], "source": []}
        for prompt, response, source in zip(prompts, responses, sources):
            example = self.tokenize_ids(self.bos + prompt, response + [self.eos])
            if example is None:
                continue
            for key, value in example.items():
                out[key].append(value)
            out["source"].append(source)
        return out

    def tokenize_ids(self, prompt: list[int], response: list[int]) -> dict[str, Any] | None:
        """Join, truncate and label one example given as token ids (BOS/EOS already added)."""
        limit = self.max_seq_length
        truncated = len(prompt) + len(response) > limit
        if truncated:
            budget = max(limit - len(response), limit // 2)
            prompt = _cut_prompt(prompt, budget, self.keep_tail, keep_head=len(self.bos) + 1)
            if prompt is None or limit - len(prompt) < 1:
                return None
            response = response[: limit - len(prompt)]
        ids = prompt + response
        return {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * len(prompt) + response,
            "length": len(ids),
            "truncated": truncated,
        }


def tokenize_example(
    tokenizer: Any, record: dict[str, str], max_seq_length: int
) -> dict[str, Any] | None:
    """One record -> {input_ids, attention_mask, labels, length, truncated, source}, or None."""
    batch = {key: [record.get(key, "")] for key in ("instruction", "input", "output", "source")}
    out = ExampleTokenizer(tokenizer, max_seq_length)(batch)
    return {key: value[0] for key, value in out.items()} if out["input_ids"] else None
