"""``dylora ckpt list|show|verify REF``: what a user sees of checkpoints and stores."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import CheckpointError
from .directory import list_checkpoints
from .format import read_manifest
from .references import fetch, parse_reference
from .stores import open_store


def list_refs(ref: str) -> str:
    """Versions of a store, or complete checkpoints of a local run/checkpoints directory."""
    parsed = parse_reference(ref)
    rows = []
    if parsed.kind in ("auto", "latest"):
        raise CheckpointError(f"{ref!r} names the checkpoints of a training run: give its run directory or "
                              "its store (RUN_DIR/store) instead.")
    if parsed.kind == "path":
        path = Path(parsed.location).expanduser()
        parent = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        for step, ckpt in list_checkpoints(parent):
            rows.append(f"{ckpt.name:<22} step {step:>8}  {read_manifest(ckpt).total_size:>12,} bytes")
        store_dir = path / "store"
        if store_dir.is_dir():
            rows.append(f"store {store_dir}:")
            rows += _store_rows(open_store(str(store_dir)))
    else:  # a store (its alias, if any, does not narrow the listing)
        rows += _store_rows(open_store(parsed.location))
    if not rows:
        raise CheckpointError(f"no complete checkpoint found at {ref!r}.")
    return "\n".join(rows)


def _store_rows(store) -> list[str]:
    return [
        f"  {v.version:<6} step {v.step if v.step is not None else '?':>8}  {v.size or 0:>12,} bytes  "
        f"{v.created or '':<25} {', '.join(v.aliases)}"
        for v in store.list_versions()
    ]


def show(ref: str) -> str:
    with tempfile.TemporaryDirectory() as work:
        directory = fetch(ref, Path(work))
        manifest = read_manifest(directory)
        lines = [
            f"checkpoint {ref}",
            f"  step {manifest.global_step}, epoch {manifest.epoch}, created {manifest.created_at}",
            f"  files: {len(manifest.files)} ({manifest.total_size:,} bytes)",
            "  fingerprint:",
            *[f"    {k}: {json.dumps(v) if isinstance(v, list) else v}" for k, v in manifest.fingerprint.items()],
            f"  data position: {json.dumps(manifest.data_state)}",
            f"  wandb: {json.dumps(manifest.wandb)}",
            f"  versions: {json.dumps(manifest.versions)}",
        ]
        return "\n".join(lines)


def verify(ref: str) -> str:
    with tempfile.TemporaryDirectory() as work:
        directory = fetch(ref, Path(work))  # fetch verifies every checksum
        manifest = read_manifest(directory)
        return (f"ok: {ref} (step {manifest.global_step}, {len(manifest.files)} files, "
                f"{manifest.total_size:,} bytes verified)")


__all__ = ["list_refs", "show", "verify"]
