"""Turn rows of the supported dataset schemas into normalised records.

A *record* is the one shape the rest of the data pipeline sees::

    {"instruction": str, "input": str, "output": str, "source": str}

``input`` is optional context (``""`` when absent); ``output`` is the response the model learns.
Supported schemas, recognised by their column names (first match wins):

=================  ==============================================  ===========================
schema             columns                                          example datasets
=================  ==============================================  ===========================
``sharegpt``       ``conversations: [{from, value}, ...]``          Python-Code-23k-ShareGPT
``alpaca``         ``instruction, output`` (+ optional ``input``)  CodeAlpaca, Evol-Instruct,
                                                                    python-codes-25k, 18k alpaca
``query_answer``   ``query, answer``                               CodeFeedback
``mbpp``           ``text, code`` (+ ``test_list``)                MBPP
``prompt_completion`` ``prompt, completion``                       generic SFT files
=================  ==============================================  ===========================

Rows that cannot make a record (a missing or non-text field, an empty instruction or response)
become ``None``; callers count and skip them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import DataError

RECORD_FIELDS = ("instruction", "input", "output", "source")

# Schema name -> the columns that identify it, in detection order.
SCHEMA_COLUMNS: dict[str, tuple[str, ...]] = {
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "query_answer": ("query", "answer"),
    "mbpp": ("text", "code"),
    "prompt_completion": ("prompt", "completion"),
}

# ShareGPT speaker names (``from``) and their OpenAI-style equivalents (``role``).
_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "model", "chatgpt", "bard"}


def detect_schema(columns: Iterable[str], where: str) -> str:
    """The schema whose identifying columns are all present; ``where`` names the data in errors."""
    present = set(columns)
    for schema, needed in SCHEMA_COLUMNS.items():
        if present.issuperset(needed):
            return schema
    accepted = "; ".join(f"{name} ({', '.join(cols)})" for name, cols in SCHEMA_COLUMNS.items())
    raise DataError(
        f"Cannot tell the schema of {where}: its columns are {sorted(present)}. Accepted schemas "
        f"and the columns that identify them: {accepted}."
    )


def _text(value: Any) -> str | None:
    """A stripped string with Unix line endings, or None when the value is not usable text."""
    if not isinstance(value, str):
        return None
    return value.replace("\r\n", "\n").replace("\r", "\n").strip()


def _response(value: Any) -> str | None:
    """Like ``_text`` but keeps leading indentation of the first code line."""
    if not isinstance(value, str):
        return None
    return value.replace("\r\n", "\n").replace("\r", "\n").strip("\n").rstrip()


def _speaker(turn: Mapping[str, Any]) -> str:
    # Arrow gives every turn all keys seen in the column, so absent ones are None, not missing.
    return str(turn.get("from") or turn.get("role") or "").lower()


def _said(turn: Mapping[str, Any]) -> Any:
    return turn.get("value") if turn.get("value") is not None else turn.get("content")


def _sharegpt(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """The first human turn and the assistant reply that follows it; later turns are ignored.

    Turns are ``{from, value}`` (ShareGPT: human/gpt) or ``{role, content}`` (user/assistant).
    """
    turns = row.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, Mapping) for t in turns):
        return None, "", None
    for turn, reply in zip(turns, turns[1:]):
        if _speaker(turn) in _HUMAN:
            if _speaker(reply) not in _ASSISTANT:
                return None, "", None
            return _said(turn), "", _said(reply)
    return None, "", None


def to_record(
    row: Mapping[str, Any], schema: str, source: str, mbpp_first_test: bool = True
) -> dict[str, str] | None:
    """One normalised record from a row of ``schema``, or None if the row is unusable.

    For MBPP, ``mbpp_first_test`` puts the first test assert in ``input``: it names the function
    and its call convention, which the evaluation's tests rely on.
    """
    if schema == "sharegpt":
        instruction, context, output = _sharegpt(row)
    elif schema == "alpaca":
        instruction, context, output = row.get("instruction"), row.get("input"), row.get("output")
    elif schema == "query_answer":
        instruction, context, output = row.get("query"), "", row.get("answer")
    elif schema == "mbpp":
        tests = row.get("test_list") or []
        first = tests[0] if mbpp_first_test and isinstance(tests, list) and tests else ""
        instruction, context, output = row.get("text"), first, row.get("code")
    elif schema == "prompt_completion":
        instruction, context, output = row.get("prompt"), "", row.get("completion")
    else:
        raise DataError(f"Unknown schema {schema!r}; accepted: {', '.join(SCHEMA_COLUMNS)}.")

    instruction, output = _text(instruction), _response(output)
    context = "" if context is None else _text(context)
    if not instruction or not output or context is None:
        return None
    return {"instruction": instruction, "input": context, "output": output, "source": source}


def records_from_batch(
    batch: Mapping[str, list[Any]], schema: str, source: str, mbpp_first_test: bool = True
) -> dict[str, list[str]]:
    """``Dataset.map(batched=True)`` helper: a column batch's usable rows, as record columns."""
    size = len(next(iter(batch.values()))) if batch else 0
    out: dict[str, list[str]] = {field: [] for field in RECORD_FIELDS}
    for i in range(size):
        record = to_record({k: v[i] for k, v in batch.items()}, schema, source, mbpp_first_test)
        if record is not None:
            for field in RECORD_FIELDS:
                out[field].append(record[field])
    return out
