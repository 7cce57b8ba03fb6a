"""``--model REF`` for inference (``dylora generate``, ``dylora serve``): a model and its tokenizer.

REF is, in order: a run directory (the ``final/`` model it finished with), a checkpoint reference in
the one grammar of ``checkpoint/references.py`` (fetched and verified), a saved mixture directory, or
a base model (a local model directory, a hub id, ``tiny-python-lm``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..checkpoint.references import fetch_model
from ..errors import ConfigError
from ..model.base import DEFAULT_MODEL_NAME, load_base_model, load_tokenizer
from ..model.io import CONFIG_NAME
from ..model.trained import load_trained_mixture


def load_for_inference(ref: str, purpose: str = "dylora") -> tuple:
    """(model in eval mode, tokenizer, a line saying what was loaded) for ``--model REF``."""
    path = Path(ref).expanduser()
    if (path / "final" / CONFIG_NAME).is_file():  # a run directory: the model it finished with
        ref, path = str(path / "final"), path / "final"
    with tempfile.TemporaryDirectory(prefix=f"{purpose}-") as downloads:  # a fetched checkpoint, loaded then removed
        directory = fetch_model(ref, Path(downloads))
        if directory is None and (path / CONFIG_NAME).is_file():
            directory = path
        if directory is not None:
            model, tokenizer = load_trained_mixture(directory)
            base = model.config.base_model_name_or_path
            what = f"model: the mixture {ref} ({model.num_experts} experts on {base})"
    if directory is None:  # a base model by name or directory: the model before training, for comparison
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError(f"--model {ref!r}: the directory holds neither a trained mixture ({CONFIG_NAME}), a "
                              "checkpoint nor a model (config.json). Give a run directory (runs/RUN_ID), a trained "
                              "mixture (runs/RUN_ID/final), a checkpoint reference (runs/RUN_ID/store:latest, "
                              f"s3://..., wandb://...), a base model directory, a hub id, or {DEFAULT_MODEL_NAME!r}.")
        base = ref
        model, tokenizer = load_base_model(ref, flag="--model").eval(), load_tokenizer(ref, flag="--model")
        what = f"model: the base model {ref} (no experts)"
    if base == DEFAULT_MODEL_NAME:
        what += (f"\nnote: {DEFAULT_MODEL_NAME} is the tiny demo model shipped with dylora-moe (a few million "
                 "parameters): expect rough completions; train a real base with --model_name for useful ones")
    return model, tokenizer, what
