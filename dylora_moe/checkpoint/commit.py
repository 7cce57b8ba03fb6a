"""Writing a checkpoint atomically, and clearing what an interrupted write left behind.

Writing (``write_checkpoint``) happens in a staging directory ``.tmp-<name>-<random>`` next to
the final one: the caller's ``write_files(staging)`` writes the payload, we hash every file
(streamed), write the manifest, fsync every file and directory, and ``rename`` the staging
directory to its final name. A reader therefore sees a whole checkpoint or none, and anything a
crash leaves behind starts with a dot, is ignored by readers and removed by ``cleanup_partial``.
Replacing an existing checkpoint (``overwrite=True``) exchanges the two directories atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux); elsewhere the old one is first moved aside to
``.old-<name>-<random>``, which ``cleanup_partial`` moves back if a crash came before the new one
was in place.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import secrets
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import CheckpointError
from .format import MANIFEST_NAME, Manifest, hash_file, library_versions, payload_files

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (directories after their contents)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def make_staging_dir(parent_dir: Path, name: str) -> Path:
    """Create ``parent_dir/.tmp-<name>-<random>``, a place to build ``parent_dir/name``."""
    _check_name(name)
    parent_dir = Path(parent_dir)
    parent_dir.mkdir(parents=True, exist_ok=True)
    staging = parent_dir / f"{TMP_PREFIX}{name}-{secrets.token_hex(6)}"
    staging.mkdir()
    return staging


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name in ("..", "."):
        raise CheckpointError(f"Checkpoint name {name!r} is not allowed; use a plain directory "
                              "name that does not start with '.' (e.g. 'step-00000120').")


def commit_staged(staging: Path, final: Path, *, overwrite: bool = False) -> Path:
    """fsync ``staging`` and atomically rename it to ``final`` (see the module docstring)."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise CheckpointError(f"Checkpoint {final} already exists and is never overwritten "
                                  "implicitly; pass overwrite=True to replace it or use another "
                                  "name.")
        _swap(staging, final)
    else:
        os.rename(staging, final)
    fsync_path(final.parent)
    return final


def _swap(staging: Path, final: Path) -> None:
    if _rename_exchange(staging, final):
        shutil.rmtree(staging)  # now holds the old checkpoint
        return
    aside = final.parent / f"{OLD_PREFIX}{final.name}-{secrets.token_hex(6)}"
    os.rename(final, aside)
    os.rename(staging, final)
    fsync_path(final.parent)
    shutil.rmtree(aside)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux renameat2; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0  # EINVAL (e.g. a filesystem without support): fall back


def write_checkpoint(parent_dir: Path, name: str, write_files: Callable[[Path], None],
                     manifest_fields: Mapping[str, Any] | None = None, *,
                     overwrite: bool = False) -> Path:
    """Write ``parent_dir/name`` atomically and return its path.

    ``write_files(staging)`` writes the payload into an empty staging directory (it must not
    write ``manifest.json``). ``manifest_fields`` fills the Manifest (``global_step``, ``epoch``,
    ``fingerprint``, ...); ``files`` and ``format_version`` are computed here, ``created_at``
    and ``versions`` default to now and ``library_versions()``.
    """
    fields = dict(manifest_fields or {})
    for computed in ("files", "format_version"):
        if computed in fields:
            raise CheckpointError(f"manifest_fields may not set {computed!r}: write_checkpoint "
                                  "computes it.")
    fields.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    fields.setdefault("versions", library_versions())
    try:
        manifest = Manifest(**fields)
    except TypeError as e:
        raise CheckpointError(f"Bad manifest_fields {sorted(fields)}: {e}. Accepted fields: "
                              f"{[f.name for f in dataclasses.fields(Manifest)]}.") from e
    final = Path(parent_dir) / name
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise CheckpointError(f"Checkpoint {final} already exists and is never overwritten "
                              "implicitly; pass overwrite=True to replace it or use another name.")
    staging = make_staging_dir(Path(parent_dir), name)
    try:
        write_files(staging)
        if (staging / MANIFEST_NAME).exists():
            raise CheckpointError(f"write_files wrote {MANIFEST_NAME} itself; the manifest is "
                                  "written by write_checkpoint, after the payload.")
        for rel in payload_files(staging):
            sha256, size = hash_file(staging / rel)
            manifest.files[rel] = {"sha256": sha256, "size": size}
        with open(staging / MANIFEST_NAME, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
        return commit_staged(staging, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def cleanup_partial(parent_dir: Path, min_age_s: float = 0.0) -> list[Path]:
    """Remove leftovers of interrupted writes (``.tmp-*``) older than ``min_age_s``.

    A checkpoint moved aside by an interrupted overwrite (``.old-<name>-*``) is moved back when
    ``<name>`` is missing. Returns the removed paths.
    """
    parent_dir = Path(parent_dir)
    if not parent_dir.is_dir():
        return []
    removed, now = [], time.time()
    for path in sorted(parent_dir.iterdir()):
        if path.name.startswith(OLD_PREFIX) and path.is_dir():
            original = parent_dir / path.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
            if not original.exists() and (path / MANIFEST_NAME).is_file():
                os.rename(path, original)
                log.warning("Restored %s from interrupted overwrite %s", original, path)
                continue
        elif not path.name.startswith(TMP_PREFIX):
            continue
        if now - path.lstat().st_mtime < min_age_s:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
