"""The on-disk checkpoint format: a directory, its manifest, and how it is written atomically.

A checkpoint is a directory (``RUN_DIR/checkpoints/step-00000120/``) holding payload files and a
``manifest.json`` that lists the SHA-256 and size of every other file. The manifest is the commit
record: it is written last, so a directory without one is never a checkpoint.

Writing (``write_checkpoint``) happens in a staging directory ``.tmp-<name>-<random>`` next to
the final one: the caller's ``write_files(staging)`` writes the payload, we hash every file
(streamed), write the manifest, fsync every file and directory, and ``rename`` the staging
directory to its final name. A reader therefore sees a whole checkpoint or none, and anything a
crash leaves behind starts with a dot, is ignored by readers and removed by ``cleanup_partial``.
Replacing an existing checkpoint (``overwrite=True``) exchanges the two directories atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux); elsewhere the old one is first moved aside to
``.old-<name>-<random>``, which ``cleanup_partial`` moves back if a crash came before the new one
was in place.

What goes into the payload (weights, optimizer state, ...) and into the fingerprint is the
trainer's business; this module only guarantees that the bytes it was given come back intact.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Iterable, Any, Callable, Mapping

import dylora_moe
from dylora_moe.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_CHUNK = 1 << 20


def checkpoint_name(global_step: int) -> str:
    """The directory name of the checkpoint taken after ``global_step`` optimizer steps."""
    return f"step-{int(global_step):08d}"


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries a checkpoint depends on (None for one not installed)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "peft"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    versions["dylora_moe"] = dylora_moe.__version__
    return versions


@dataclass
class Manifest:
    """Everything a checkpoint says about itself; ``files`` maps relative paths to sha256/size."""

    format_version: int = FORMAT_VERSION
    global_step: int = 0
    epoch: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    training_config: dict[str, Any] = field(default_factory=dict)
    data_state: dict[str, Any] = field(default_factory=dict)
    wandb: dict[str, Any] = field(default_factory=dict)  # {"run_id": ..., "step": ...}
    versions: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        """Bytes of the payload files (the manifest itself not included)."""
        return sum(int(entry["size"]) for entry in self.files.values())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest.json") -> "Manifest":
        """Parse and check a manifest; ``source`` names it in error messages."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"Checkpoint manifest {source} is not valid JSON ({e}); the "
                                  "checkpoint is damaged or was not written by dylora_moe.") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"Checkpoint manifest {source} holds a {type(data).__name__}, "
                                  "expected a JSON object.")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"Checkpoint manifest {source} has format_version {version!r}; this version of "
                f"dylora_moe reads format_version {FORMAT_VERSION} only. Use the dylora_moe "
                "version that wrote the checkpoint.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"Checkpoint manifest {source} has unknown fields {unknown}; "
                                  f"format_version {FORMAT_VERSION} has {sorted(known)}.")
        manifest = cls(**data)
        if not isinstance(manifest.files, dict):
            raise CheckpointError(f"Checkpoint manifest {source}: 'files' must be an object "
                                  "mapping relative paths to {sha256, size}.")
        for rel, entry in manifest.files.items():
            _check_relative_path(rel, source)
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("size"), int)):
                raise CheckpointError(f"Checkpoint manifest {source}: entry for {rel!r} is "
                                      f"{entry!r}, expected {{'sha256': str, 'size': int}}.")
        return manifest


def _check_relative_path(rel: str, source: str) -> None:
    path = PurePosixPath(rel)
    if (not rel or path.is_absolute() or ".." in path.parts or "\\" in rel
            or rel == MANIFEST_NAME or str(path) != rel):
        raise CheckpointError(f"Checkpoint manifest {source} lists the file {rel!r}; file names "
                              "must be normalised relative paths inside the checkpoint (no '..', "
                              f"no leading '/', not {MANIFEST_NAME}).")


def read_manifest(ckpt_dir: Path) -> Manifest:
    """Parse ``ckpt_dir/manifest.json`` (no hashing)."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is not a complete checkpoint: it has no "
                              f"{MANIFEST_NAME} (an interrupted write leaves none).") from None
    return Manifest.from_json(text, source=str(path))


def is_complete(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` is a committed checkpoint (its manifest exists). Cheap: no hashing."""
    name = os.path.basename(os.path.abspath(ckpt_dir))
    return not name.startswith(".") and (Path(ckpt_dir) / MANIFEST_NAME).is_file()


def hash_file(path: Path) -> tuple[str, int]:
    """Streamed SHA-256 hex digest and size of a file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _payload_files(root: Path) -> list[str]:
    """Relative posix paths of all files under ``root`` except the manifest; refuses links."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise CheckpointError(f"{path} is a link or special file; checkpoints hold "
                                      "regular files and directories only.")
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


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
        for rel in _payload_files(staging):
            sha256, size = hash_file(staging / rel)
            manifest.files[rel] = {"sha256": sha256, "size": size}
        with open(staging / MANIFEST_NAME, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
        return commit_staged(staging, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def verify_checkpoint(ckpt_dir: Path) -> Manifest:
    """Check that ``ckpt_dir`` is exactly what its manifest says; return the manifest.

    Every listed file must exist with the listed size and SHA-256, and no other file may be
    present. All problems are reported together, each naming the file.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"Checkpoint directory {ckpt_dir} does not exist or is not a "
                              "directory.")
    manifest = read_manifest(ckpt_dir)
    problems = []
    for rel, entry in sorted(manifest.files.items()):
        path = ckpt_dir / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{rel} has {size} bytes, the manifest expects {entry['size']}")
            continue
        sha256, _ = hash_file(path)
        if sha256 != entry["sha256"]:
            problems.append(f"{rel} has sha256 {sha256}, the manifest expects {entry['sha256']}")
    for rel in _payload_files(ckpt_dir):
        if rel not in manifest.files:
            problems.append(f"{rel} is not listed in the manifest (stray file)")
    if problems:
        raise CheckpointError(f"Checkpoint {ckpt_dir} failed verification: "
                              + "; ".join(problems) + ". The checkpoint is damaged or was "
                              "modified after it was written; use another checkpoint.")
    return manifest


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
