"""Turning ``--resume REF`` into a verified local checkpoint, before any training starts.

Order: resolve the reference (``auto``: newest complete checkpoint of this run, locally then in
the store), fetch and verify every checksum, then the caller compares fingerprints. A reference
that cannot be fetched is an error naming it and the cause, unless ``allow_fresh_start`` asks for
the seed's behaviour (warn, start fresh; existing versions are never overwritten because the
store numbers versions past everything it holds).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import CheckpointError
from .references import fetch, find_auto
from .stores import CheckpointStore

log = logging.getLogger(__name__)


def resolve_resume(
    ref: str | None,
    run_dir: Path,
    store: CheckpointStore | None,
    *,
    bare_is_wandb: bool = False,
    allow_fresh_start: bool = False,
) -> Path | None:
    """A verified local checkpoint directory to resume from, or None for a fresh start."""
    if not ref:
        return None
    if ref == "auto":
        try:
            found = find_auto(run_dir, store)
        except CheckpointError as err:
            if allow_fresh_start:
                log.warning("--resume auto: %s; starting fresh (--allow_fresh_start)", err)
                return None
            raise
        if found is None:
            log.info("--resume auto: no complete checkpoint of run %s locally or in the store; starting fresh", run_dir.name)
            return None
        log.info("--resume auto: resuming from %s", found)
        ref = found
    try:
        return fetch(ref, run_dir / "downloads", run_dir=run_dir, bare_is_wandb=bare_is_wandb)
    except CheckpointError as err:
        if allow_fresh_start:
            log.warning("%s Starting fresh instead (--allow_fresh_start).", err)
            return None
        raise
