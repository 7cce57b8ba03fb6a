"""The shipped base model ``tiny-python-lm`` (package data in ``dylora_moe/model/shipped/``): loadable
offline, small, and really pretrained."""

from __future__ import annotations

import json
import math
import os
import pathlib
import tokenize

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest
import torch

from dylora_moe.data.stdlib_split import stdlib_files
from dylora_moe.model.base import DEFAULT_MODEL_NAME, resolve_model_path

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_DIR = pathlib.Path(resolve_model_path(DEFAULT_MODEL_NAME))
MAX_BYTES = 20 * 1000 * 1000
SNIPPET = (
    "import os\n\n\n"
    "class Greeter:\n"
    '    """Say hello."""\n\n'
    "    def __init__(self, name: str = 'wörld') -> None:\n"
    "        self.name = name\n\n"
    "\tdef greet(self):  # tab-indented, odd spacing\n"
    "        return f\"hello, {self.name}!\" if self.name else None  \n"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
    m.eval()
    return m


@pytest.fixture(scope="module")
def report():
    return json.loads((MODEL_DIR / "build_report.json").read_text())


def test_default_name_resolves_to_the_package_data():
    assert MODEL_DIR == REPO_ROOT / "dylora_moe" / "model" / "shipped" / "tiny-python-lm"
    assert resolve_model_path("dylora/tiny-python-lm") == str(MODEL_DIR)
    assert resolve_model_path("org/not-shipped") == "org/not-shipped"  # a hub id passes through


def test_loads_offline_as_llama(model, tokenizer):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    assert isinstance(model, LlamaForCausalLM)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)


def test_special_tokens_consistent(model, tokenizer):
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer("x = 1").input_ids[0] == tokenizer.bos_token_id


def test_size_on_disk():
    files = [f for f in MODEL_DIR.rglob("*") if f.is_file()]
    apparent = sum(f.stat().st_size for f in files)
    allocated = sum(f.stat().st_blocks * 512 for f in files)  # what `du` counts
    assert max(apparent, allocated) <= MAX_BYTES, (apparent, allocated)
    assert (MODEL_DIR / "model.safetensors").is_file()


def test_tokenizer_round_trip(tokenizer):
    ids = tokenizer.encode(SNIPPET, add_special_tokens=False)
    assert tokenizer.decode(ids) == SNIPPET
    with_bos = tokenizer.encode(SNIPPET)
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == SNIPPET
    assert len(ids) < len(SNIPPET.encode("utf-8")) / 2  # BPE actually merges


def test_recorded_held_out_loss_beats_unigram(report):
    ev = report["evaluation"]
    assert ev["held_out_loss"] < ev["unigram_held_out_loss"] - 1.0
    assert math.isclose(ev["held_out_perplexity"], math.exp(ev["held_out_loss"]), rel_tol=1e-3)


def _held_out_stream(tokenizer, tokens_per_file: int, every: int = 1) -> list[int]:
    """The build script's held-out sample: ``<|bos|> tokens <|eos|>`` of every held-out file (or of
    every ``every``-th one), cut to its first ``tokens_per_file`` tokens, all concatenated."""
    texts = []
    for path in stdlib_files(held_out=True)[::every]:
        with tokenize.open(path) as f:  # decoded as the build script does
            texts.append(f.read())
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [t for e in encodings for t in ([bos, *e.ids, eos])[:tokens_per_file]]


def test_remeasured_held_out_loss(model, tokenizer, report):
    """Re-measure the loss on a few thousand held-out tokens (every 10th evaluation window of the
    build's held-out sample, restricted to every 4th held-out file) and compare it with two unigram
    baselines: the one the build recorded (fit on the training corpus), and this very sample's own
    empirical token entropy, a lower bound on any unigram model's cross-entropy on it."""
    ev = report["evaluation"]
    seq_len = ev["context_len"]
    stream = _held_out_stream(tokenizer, ev["held_out_tokens_per_file"], every=4)
    windows = [stream[s : s + seq_len + 1] for s in range(0, len(stream) - seq_len - 1, seq_len)]
    batch = torch.tensor(windows[::10])
    targets = batch[:, 1:].reshape(-1)
    assert targets.numel() >= 2000

    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets))

    counts = torch.bincount(targets, minlength=len(tokenizer)).double()
    probs = counts[counts > 0] / counts.sum()
    sample_unigram_entropy = float(-(probs * probs.log()).sum())

    print(f"held-out sample of {targets.numel()} tokens: model {loss:.3f} nats/token, "
          f"sample unigram entropy {sample_unigram_entropy:.3f}, recorded unigram {ev['unigram_held_out_loss']:.3f}")
    assert loss < sample_unigram_entropy - 0.75, (loss, sample_unigram_entropy)
    assert loss < ev["unigram_held_out_loss"] - 1.25, (loss, ev["unigram_held_out_loss"])
    # and it agrees with the full measurement the build recorded (a subset of the same windows)
    assert abs(loss - ev["held_out_loss"]) < 0.5, (loss, ev["held_out_loss"])
