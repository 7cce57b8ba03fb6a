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
from .references import fetch, find_auto, parse_reference
from .stores import CheckpointStore

log = logging.getLogger(__name__)


def resolve_resume(
    ref: str | None,
    run_dir: Path,
    store: CheckpointStore | None,
    *,
    bare_is_wandb: bool = False,
    allow_fresh_start: bool = False,
    start_from: str | None = None,
    timeout_s: float | None = None,
) -> Path | None:
    """A verified local checkpoint directory to resume from, or None for a fresh start.

    ``start_from``: where ``auto`` goes when the run has no checkpoint of its own (a restarted
    job continues from its own checkpoints, never from ``start_from`` again).
    """
    if not ref:
        return None
    if parse_reference(ref, bare_is_wandb=bare_is_wandb).kind == "auto":
        try:
            own = _auto(run_dir, store, timeout_s)
        except CheckpointError as err:
            if allow_fresh_start:
                log.warning("--resume auto: %s; starting fresh (--allow_fresh_start)", err)
                return None
            raise
        if own is not None or not start_from:
            return own
        log.info("run %s has no checkpoint of its own: starting from --start_from %s", run_dir.name, start_from)
        ref, bare_is_wandb = start_from, False
    try:
        return fetch(ref, run_dir / "downloads", run_dir=run_dir, bare_is_wandb=bare_is_wandb, timeout_s=timeout_s)
    except CheckpointError as err:
        if allow_fresh_start:
            log.warning("%s Starting fresh instead (--allow_fresh_start).", err)
            return None
        raise


def _auto(run_dir: Path, store: CheckpointStore | None, timeout_s: float | None) -> Path | None:
    """Newest complete local checkpoint; if it fails verification, the store's newest version."""
    local = find_auto(run_dir, None)
    if local is not None:
        try:
            path = fetch(local, run_dir / "downloads", run_dir=run_dir)
            log.info("--resume auto: resuming from %s", path)
            return path
        except CheckpointError as err:
            if store is None:
                raise
            log.warning("--resume auto: the local checkpoint is unusable (%s); trying the store %s", err, store.url)
            local_error = err
    else:
        local_error = None
    remote = find_auto(None, store) if store is not None else None
    if remote is None:
        if local_error is not None:
            raise local_error
        log.info("--resume auto: no complete checkpoint of run %s locally or in the store", run_dir.name)
        return None
    path = fetch(remote, run_dir / "downloads", run_dir=run_dir, timeout_s=timeout_s)
    log.info("--resume auto: resuming from %s (%s)", remote, path)
    return path
