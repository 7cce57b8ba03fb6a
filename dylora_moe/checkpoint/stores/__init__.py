"""Checkpoint stores: where published checkpoints live (see ``base`` for the interface).

``open_store`` turns a store address into a backend: a local path, an fsspec URL
(``file://``, ``memory://``, ``s3://``, ``gs://``) or ``wandb://ENTITY/PROJECT/NAME``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dylora_moe.checkpoint.stores.background import BackgroundPublisher
from dylora_moe.checkpoint.stores.base import (CheckpointStore, StoreUnreachableError,
                                               VersionInfo)
from dylora_moe.checkpoint.stores.fsspec_store import FsspecStore
from dylora_moe.checkpoint.stores.local import LocalStore
from dylora_moe.errors import CheckpointError

__all__ = ["BackgroundPublisher", "CheckpointStore", "FsspecStore", "LocalStore",
           "StoreUnreachableError", "VersionInfo", "open_store"]


def open_store(address: str | Path, *, storage_options: dict[str, Any] | None = None,
               wandb_api: Any = None, timeout_s: float | None = None) -> CheckpointStore:
    """The store at ``address``: ``wandb://E/P/NAME``, an fsspec URL, or a local directory."""
    address = str(address)
    if address.startswith("wandb://"):
        from dylora_moe.checkpoint.stores.wandb_store import WandbStore

        parts = address[len("wandb://"):].strip("/").split("/")
        if len(parts) != 3 or not all(parts):
            raise CheckpointError(f"W&B store address {address!r} is malformed; expected "
                                  "wandb://ENTITY/PROJECT/NAME.")
        return WandbStore(*parts, api=wandb_api,
                          timeout_s=None if timeout_s is None else int(timeout_s))
    if "://" in address:
        return FsspecStore(address, storage_options, timeout_s)
    return LocalStore(Path(address))
