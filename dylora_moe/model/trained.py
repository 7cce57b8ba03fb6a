"""A trained mixture and its tokenizer, ready for inference (``dylora generate``, the routing report).

Above the wrapper (it builds a ``DyLoRAMoE``), while ``io`` lies below it: the wrapper's
``save_pretrained``/``from_pretrained`` use ``io``, so ``io`` cannot import the wrapper.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from .dylora import DyLoRAMoE
from .io import CONFIG_NAME


def load_trained_mixture(model_ref: str | os.PathLike, flag: str = "--model"):
    """A trained mixture directory (a run's ``final/`` or a fetched checkpoint) and its tokenizer, for inference.

    The tokenizer saved beside the mixture is used when there is one, else the base model's.
    """
    from .base import load_tokenizer

    model_dir = Path(model_ref)
    if not (model_dir / CONFIG_NAME).is_file():
        raise ConfigError(f"{flag} {str(model_ref)!r} is not a trained mixture (no {CONFIG_NAME}); give a run's "
                          "'final' directory (runs/RUN_ID/final) or a checkpoint reference "
                          "(a run or checkpoint directory, "
                          "runs/RUN_ID/store:latest, s3://BUCKET/PATH/store:latest, wandb://E/P/NAME:ALIAS, ...).")
    model = DyLoRAMoE.from_pretrained(model_dir).eval()
    saved_tokenizer = (model_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(model_dir) if saved_tokenizer else model.config.base_model_name_or_path)
    return model, tokenizer
