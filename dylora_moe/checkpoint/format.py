"""The on-disk checkpoint format: a directory and its manifest.

A checkpoint is a directory (``RUN_DIR/checkpoints/step-00000120/``) holding payload files and a
``manifest.json`` that lists the SHA-256 and size of every other file. The manifest is the commit
record: it is written last (``commit.write_checkpoint``), so a directory without one is never a
checkpoint, and ``verify_checkpoint`` checks that a directory is exactly what its manifest says.

What goes into the payload (weights, optimizer state, ...) and into the fingerprint is the
trainer's business; the checkpoint package only guarantees that the bytes it was given come back intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from .. import __version__
from ..errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
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
    versions["dylora_moe"] = __version__
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


def payload_files(root: Path) -> list[str]:
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
    for rel in payload_files(ckpt_dir):
        if rel not in manifest.files:
            problems.append(f"{rel} is not listed in the manifest (stray file)")
    if problems:
        raise CheckpointError(f"Checkpoint {ckpt_dir} failed verification: "
                              + "; ".join(problems) + ". The checkpoint is damaged or was "
                              "modified after it was written; use another checkpoint.")
    return manifest
