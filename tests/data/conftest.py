"""Shared fixtures: a small real byte-level BPE tokenizer and the offline dataset copies."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def shared_datasets_dir() -> Path:
    """``$DYLORA_DATA_DIR`` if set, else ``../shared/datasets`` next to the repository root."""
    env = os.environ.get("DYLORA_DATA_DIR")
    return Path(env) if env else (Path(__file__).parents[2] / "../shared/datasets").resolve()


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    path = shared_datasets_dir()
    if not (path / "code_alpaca_2k.json").is_file():
        pytest.skip(f"offline dataset copies not found in {path} (set DYLORA_DATA_DIR)")
    return path


@pytest.fixture(autouse=True)
def _no_ambient_data_dir(monkeypatch):
    """Tests pass data_dir explicitly; an exported DYLORA_DATA_DIR must not change what they see."""
    monkeypatch.delenv("DYLORA_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def tokenizer():
    """A 1k-token byte-level BPE trained on the stdlib ``inspect`` module, with bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = Path(inspect.getsourcefile(inspect)).read_text(encoding="utf-8")[:60_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
