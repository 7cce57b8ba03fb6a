"""How tests run the real W&B client against the fake backend (tests/fakes/wandb_server.py).

``client_env(url, home)`` is the environment of one process on a "machine" whose home directory
is ``home``: ``WANDB_BASE_URL`` points at the fake, the API key is the fake's, and the W&B
directories (run files, staging, the artifact cache, settings) live under ``home``, so a fresh
``home`` is a machine that has never seen W&B, its cache included.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.fakes.wandb_server import API_KEY

WANDB_DIRS = ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")


def client_env(url: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_BASE_URL=url, WANDB_API_KEY=API_KEY, WANDB_MODE="online",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    for name in WANDB_DIRS:
        env[name] = str(Path(home) / name.lower())
        os.makedirs(env[name], exist_ok=True)
    return env
