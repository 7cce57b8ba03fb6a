"""The shipped base model ``tiny-python-lm`` (package data in ``dylora_moe/model/shipped/``): loadable
offline, small, and really pretrained."""

from __future__ import annotations

import json
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


CONTEXT_LEN = 256  # the evaluation window, as the build script measures
TOKENS_PER_FILE = 4096  # tokens taken from the start of each file


def _stream(tokenizer, files, tokens_per_file: int = TOKENS_PER_FILE) -> list[int]:
    """``<|bos|> tokens <|eos|>`` of every file, cut to its first ``tokens_per_file`` tokens, all
    concatenated (the build script's held-out sample when given the held-out files)."""
    texts = []
    for path in files:
        with tokenize.open(path) as f:  # decoded as the build script does
            texts.append(f.read())
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [t for e in encodings for t in ([bos, *e.ids, eos])[:tokens_per_file]]


def _loss(model, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)))


def test_remeasured_held_out_loss(model, tokenizer, report):
    """Measure the loss on a few thousand held-out tokens (every 10th evaluation window of the
    held-out sample, restricted to every 4th held-out file) and compare it with baselines measured
    here, not read from the build report: a unigram model fit on a sample of the training files
    (add-one smoothed), this very sample's own empirical token entropy (a lower bound on any unigram
    model's cross-entropy on it), and the same architecture untrained."""
    assert model.config.max_position_embeddings >= CONTEXT_LEN
    stream = _stream(tokenizer, stdlib_files(held_out=True)[::4])
    windows = [stream[s : s + CONTEXT_LEN + 1] for s in range(0, len(stream) - CONTEXT_LEN - 1, CONTEXT_LEN)]
    batch = torch.tensor(windows[::10])
    targets = batch[:, 1:].reshape(-1)
    assert targets.numel() >= 2000
    loss = _loss(model, batch)

    counts = torch.bincount(targets, minlength=len(tokenizer)).double()
    probs = counts[counts > 0] / counts.sum()
    sample_unigram_entropy = float(-(probs * probs.log()).sum())

    train_counts = torch.bincount(torch.tensor(_stream(tokenizer, stdlib_files(held_out=False)[::40])),
                                  minlength=len(tokenizer)).double() + 1.0
    train_unigram = float(-(train_counts / train_counts.sum()).log()[targets].mean())

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(model.config).eval()
    untrained_loss = _loss(untrained, batch)

    print(f"held-out sample of {targets.numel()} tokens: model {loss:.3f} nats/token, sample unigram "
          f"entropy {sample_unigram_entropy:.3f}, training-files unigram {train_unigram:.3f}, untrained "
          f"{untrained_loss:.3f}")
    assert loss < sample_unigram_entropy - 0.75, (loss, sample_unigram_entropy)
    assert loss < train_unigram - 1.25, (loss, train_unigram)
    assert loss < untrained_loss - 3.0, (loss, untrained_loss)
    # The build report (the model card's numbers) agrees with this measurement (a subset of its windows).
    assert abs(loss - report["evaluation"]["held_out_loss"]) < 0.5, (loss, report["evaluation"]["held_out_loss"])
