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


def normalise(ref: str) -> tuple[str, bool]:
    """(reference, bare_is_wandb): a local ``STORE_DIR:ALIAS`` becomes a file:// store URL, and a
    bare ``E/P/NAME:ALIAS`` means W&B only when no such local path exists."""
    if "://" in ref or Path(ref).exists():
        return ref, False
    head, sep, alias = ref.rpartition(":")
    if sep and Path(head).is_dir():
        return f"{Path(head).resolve().as_uri()}:{alias}", False
    return ref, ":" in ref


def list_refs(ref: str) -> str:
    """Versions of a store, or complete checkpoints of a local run/checkpoints directory."""
    ref, bare = normalise(ref)
    parsed = parse_reference(ref, bare_is_wandb=bare)
    rows = []
    if parsed.kind == "path":
        path = Path(ref)
        parent = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        for step, ckpt in list_checkpoints(parent):
            rows.append(f"{ckpt.name:<22} step {step:>8}  {read_manifest(ckpt).total_size:>12,} bytes")
        store_dir = path / "store"
        if store_dir.is_dir():
            rows.append(f"store {store_dir}:")
            rows += _store_rows(open_store(str(store_dir)))
    else:
        rows += _store_rows(open_store(parsed.location if parsed.kind in ("wandb", "url") else ref))
    if not rows:
        raise CheckpointError(f"no complete checkpoint found at {ref!r}.")
    return "\n".join(rows)


def _store_rows(store) -> list[str]:
    return [
        f"  {v.version:<6} step {v.step if v.step is not None else '?':>8}  {v.size or 0:>12,} bytes  "
        f"{v.created or '':<25} {', '.join(v.aliases)}"
        for v in store.list_versions()
    ]


def _local_copy(ref: str, work: Path) -> Path:
    ref, bare = normalise(ref)
    return fetch(ref, work, bare_is_wandb=bare)


def show(ref: str) -> str:
    with tempfile.TemporaryDirectory() as work:
        directory = _local_copy(ref, Path(work))
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
        directory = _local_copy(ref, Path(work))  # fetch verifies every checksum
        manifest = read_manifest(directory)
        return f"ok: {ref} (step {manifest.global_step}, {len(manifest.files)} files, {manifest.total_size:,} bytes verified)"


__all__ = ["list_refs", "show", "verify"]
