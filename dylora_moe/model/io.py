"""A mixture on disk: its config (``dylora_config.json``) and trainable state (``dylora_model.safetensors``).

Nothing of the base model is written: the config names it (``base_model_name_or_path``) and
loading fetches it again. These functions know the files, not the wrapper; ``DyLoRAMoE``'s
``save_pretrained`` and ``from_pretrained`` call them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from .config import DyLoRAConfig

CONFIG_NAME = "dylora_config.json"
WEIGHTS_NAME = "dylora_model.safetensors"


def write_mixture(directory: str | os.PathLike, config: DyLoRAConfig, state: dict[str, torch.Tensor]) -> None:
    """Write ``config`` and the trainable ``state`` (tensors on any device) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    state = {k: v.contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def read_config(directory: str | os.PathLike) -> DyLoRAConfig:
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise ConfigError(f"{directory} is not a saved DyLoRA-MoE model: {CONFIG_NAME} is missing.")
    return DyLoRAConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / WEIGHTS_NAME))


def base_model_name(config: DyLoRAConfig, directory: str | os.PathLike) -> str:
    """The base model a saved mixture was trained on, as its config names it."""
    if not config.base_model_name_or_path:
        raise ConfigError(f"{Path(directory) / CONFIG_NAME} names no base model; pass base_model=.")
    return config.base_model_name_or_path
