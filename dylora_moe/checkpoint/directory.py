"""The checkpoints of a run directory: which are there, the latest, and which retention keeps.

Only complete checkpoints count (a manifest written last marks one, see ``format``); staging and
moved-aside directories (names starting with '.') belong to ``commit`` and are never touched here.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError
from .commit import TMP_PREFIX
from .format import is_complete, read_manifest

log = logging.getLogger(__name__)


def list_checkpoints(parent_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints directly under ``parent_dir`` as (global_step, path), oldest first.

    Staging and moved-aside directories (names starting with '.') are never listed; a
    checkpoint whose manifest cannot be parsed is skipped with a warning.
    """
    parent_dir = Path(parent_dir)
    if not parent_dir.is_dir():
        return []
    found = []
    for path in parent_dir.iterdir():
        if not (path.is_dir() and is_complete(path)):
            continue
        try:
            found.append((read_manifest(path).global_step, path))
        except CheckpointError as e:
            log.warning("Skipping checkpoint %s: %s", path, e)
    return sorted(found, key=lambda item: (item[0], item[1].name))


def latest_checkpoint(parent_dir: Path) -> Path | None:
    """The complete checkpoint with the highest global_step under ``parent_dir``, if any."""
    found = list_checkpoints(parent_dir)
    return found[-1][1] if found else None


def _remove_dir(path: Path) -> None:
    """Rename then delete, so no reader ever sees a half-deleted checkpoint as complete."""
    doomed = path.parent / f"{TMP_PREFIX}{path.name}-deleting-{secrets.token_hex(6)}"
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def apply_retention(parent_dir: Path, keep_last: int, best_name: str | None = None,
                    keep: Iterable[str] = ()) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep_last``, never ``best_name`` nor
    the names in ``keep`` (e.g. checkpoints a store has not confirmed yet).

    Staging directories (partial checkpoints being written) are never touched. Returns the
    deleted paths.
    """
    if not isinstance(keep_last, int) or keep_last < 1:
        raise CheckpointError(f"keep_last={keep_last!r} is not allowed; retention keeps at least "
                              "the newest checkpoint, so use an integer >= 1.")
    found = list_checkpoints(parent_dir)
    protected = {best_name, *keep}
    doomed = [path for _, path in found[:-keep_last] if path.name not in protected]
    for path in doomed:
        _remove_dir(path)
        log.info("Retention removed checkpoint %s", path)
    return doomed
