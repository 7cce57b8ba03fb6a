"""Checkpoint stores: where published checkpoints live (see ``base`` for the interface).

``open_store`` turns a store address into a backend: a local path, an fsspec URL
(``file://``, ``memory://``, ``s3://``, ``gs://``), ``wandb://ENTITY/PROJECT/NAME``, ``wandb``
(the checkpoint artifact of the active W&B run ``run``) or nothing (``RUN_DIR/store``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from .background import BackgroundPublisher
from .base import CheckpointStore, StoreUnreachableError, VersionInfo
from .download import check_free_space, install_download
from .fsspec_store import FsspecStore
from .local import LocalStore
from .object_store import ObjectCheckpointStore

__all__ = ["BackgroundPublisher", "CheckpointStore", "FsspecStore", "LocalStore", "ObjectCheckpointStore",
           "StoreUnreachableError", "VersionInfo", "check_free_space", "install_download", "open_store"]

THIS_RUN_WANDB = "wandb"  # the address of the active W&B run's own checkpoint artifact


def open_store(address: str | Path | None, *, run: Any = None, run_dir: Path | None = None,
               storage_options: dict[str, Any] | None = None, wandb_api: Any = None,
               timeout_s: float | None = None) -> CheckpointStore:
    """The store at ``address``: ``wandb://E/P/NAME``, an fsspec URL, or a local directory.

    ``wandb`` alone is the artifact ``<run id>-checkpoint`` of the active W&B ``run``; no address
    (None or '') is the run's own ``RUN_DIR/store`` (``run_dir`` given).
    """
    if address == THIS_RUN_WANDB:
        if run is None:
            raise CheckpointError("store address 'wandb' is the checkpoint artifact of the active W&B run, and "
                                  "there is none; give wandb://ENTITY/PROJECT/NAME or open a W&B run first.")
        from .wandb_store import WandbStore

        return WandbStore.for_run(run)
    if not address:
        if run_dir is None:
            raise CheckpointError("no store address given: name a directory, an fsspec URL or a W&B artifact.")
        return LocalStore.for_run_dir(run_dir)
    address = str(address)
    if address.startswith("wandb://"):
        from .wandb_store import WandbStore

        parts = address[len("wandb://"):].strip("/").split("/")
        if len(parts) != 3 or not all(parts):
            raise CheckpointError(f"W&B store address {address!r} is malformed; expected "
                                  "wandb://ENTITY/PROJECT/NAME.")
        return WandbStore(*parts, api=wandb_api,
                          timeout_s=None if timeout_s is None else int(timeout_s))
    if "://" in address:
        return FsspecStore(address, storage_options, timeout_s)
    return LocalStore(Path(address))
