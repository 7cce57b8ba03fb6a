"""Loading the frozen base model and its tokenizer by name, local path or the shipped default."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ConfigError

# The shipped, pretrained tiny Llama (card: shipped/tiny-python-lm/README.md beside this file). It is
# package data, found through the installed package: a wheel install and a source checkout both have it.
DEFAULT_MODEL_NAME = "tiny-python-lm"
_SHIPPED_MODELS = resources.files(__package__) / "shipped"


# What a command's model option accepts, for the message when its value names nothing.
_ACCEPTED = {
    "--model_name": "a local model directory (with config.json), a Hugging Face hub id such as ORG/NAME, or "
                    f"{DEFAULT_MODEL_NAME!r} for the shipped model",
    "--model": "a run directory (runs/RUN_ID), a trained mixture (runs/RUN_ID/final), a checkpoint reference "
               "(runs/RUN_ID/store:latest, s3://..., wandb://...), a base model directory, a Hugging Face hub id, or "
               f"{DEFAULT_MODEL_NAME!r} for the shipped model",
}


def resolve_model_path(name: str, flag: str = "--model_name") -> str:
    """A local directory for shipped or local models; otherwise the hub id unchanged. ``flag``: the
    option that named it, for the message."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    shipped = _SHIPPED_MODELS / name.removeprefix("dylora/")
    if shipped.is_dir():
        return str(shipped)
    if _looks_like_path(name):
        what = "is a file, not a model directory" if Path(name).expanduser().exists() else "no such directory"
        raise ConfigError(f"{flag} {name!r}: {what}. Give {_ACCEPTED.get(flag, _ACCEPTED['--model_name'])}.")
    return name


def _looks_like_path(name: str) -> bool:
    """Hub ids are NAME or ORG/NAME; anything else with a path's shape is meant as a local path."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith("/") or name.count("/") > 1


def load_base_model(name: str, dtype=None, flag: str = "--model_name", **kwargs):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name, flag)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load base model {name!r}: {err}. Give a Hugging Face hub id (reachable or cached), "
            f"a local model directory, or {DEFAULT_MODEL_NAME!r} for the shipped model."
        ) from err


def load_tokenizer(name: str, flag: str = "--model_name"):
    from transformers import AutoTokenizer

    path = resolve_model_path(name, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the tokenizer of {name!r}: {err}.") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


SMALL_MODEL_PARAMETERS = 100_000_000


def choose_threads(model, requested: int | None) -> int | None:
    """``--threads``, else 1 for small models on CPU: their per-token operations are too small to
    split across threads, and on a busy machine extra threads only wait for each other (the
    shipped 4M-parameter model generates about 5x faster on one thread here). None: torch's default."""
    if requested:
        return requested
    parameters = sum(p.numel() for p in model.parameters())
    on_cpu = next(model.parameters()).device.type == "cpu"
    return 1 if on_cpu and parameters < SMALL_MODEL_PARAMETERS else None
