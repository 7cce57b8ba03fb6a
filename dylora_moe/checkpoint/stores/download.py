"""Downloading a checkpoint safely, shared by every backend.

``install_download``: free disk space is checked first, files land in a ``.tmp-*`` staging
directory, every checksum is verified against the manifest, and only then is the directory
renamed into place. Under a fetch's deadline (``deadline.call``), the transfer is given time
for the checkpoint's size as soon as it is known.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from ...errors import CheckpointError
from ..commit import commit_staged, make_staging_dir
from ..format import MANIFEST_NAME, Manifest, hash_file, is_complete, read_manifest, verify_checkpoint
from .base import StoreUnreachableError
from .deadline import Deadline

log = logging.getLogger(__name__)


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 0


def check_free_space(dest_dir: Path, needed: int, label: str) -> None:
    """Refuse to download ``needed`` bytes where the filesystem of ``dest_dir`` lacks room."""
    probe = Path(dest_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    free = free_bytes(probe)
    required = int(needed * 1.05) + (1 << 20)  # 5% and 1 MiB of headroom
    if free < required:
        raise CheckpointError(
            f"Not enough free disk space to download {label} into {dest_dir}: it needs "
            f"{needed / 1e6:.1f} MB (plus headroom), the filesystem of {probe} has "
            f"{free / 1e6:.1f} MB free. Free some space or choose another download directory.")


def _holds(dest_dir: Path, expected: Manifest | None, manifest_sha256: str | None) -> bool:
    """Whether the manifest in ``dest_dir`` is the announced one."""
    if not (dest_dir / MANIFEST_NAME).is_file():
        return False
    if expected is not None:
        return read_manifest(dest_dir) == expected
    return bool(manifest_sha256) and hash_file(dest_dir / MANIFEST_NAME)[0] == manifest_sha256


def install_download(dest_dir: Path, fill: Callable[[Path], None], label: str, *,
                     expected: Manifest | None = None, manifest_sha256: str | None = None,
                     size: int | None = None) -> Path:
    """Download a checkpoint into ``dest_dir`` safely; shared by every backend.

    ``fill(staging)`` writes the files. What the store says the checkpoint is, ``expected``
    (its manifest) or ``manifest_sha256`` (the hash of its manifest.json), must match the
    download, and a ``dest_dir`` that already holds exactly that checkpoint is verified and
    reused. Free space is checked against the manifest's total size, or ``size``.
    """
    dest_dir = Path(dest_dir)
    if dest_dir.exists():
        if is_complete(dest_dir) and _holds(dest_dir, expected, manifest_sha256):
            verify_checkpoint(dest_dir)
            log.info("Reusing the verified download of %s at %s", label, dest_dir)
            return dest_dir
        raise CheckpointError(f"Cannot download {label}: {dest_dir} already exists and holds "
                              "something else; remove it or choose another destination.")
    needed = expected.total_size if expected is not None else size
    if needed is not None:
        check_free_space(dest_dir.parent, needed, label)
        deadline = Deadline.current()
        if deadline is not None:  # a fetch under one deadline: the transfer gets time for its size, once
            deadline.allow_transfer(needed)
    staging = make_staging_dir(dest_dir.parent, dest_dir.name)
    try:
        try:
            fill(staging)
        except CheckpointError:
            raise
        except Exception as e:
            raise StoreUnreachableError(f"Downloading {label} failed: {type(e).__name__}: {e}. "
                                        f"Nothing was written to {dest_dir}; check the store's "
                                        "address and credentials, or retry later.") from e
        verify_checkpoint(staging)
        if (expected is not None or manifest_sha256) and not _holds(staging, expected,
                                                                     manifest_sha256):
            raise CheckpointError(f"Downloading {label}: the downloaded manifest.json is not the "
                                  "one the store announced (it changed during the download, or "
                                  "was damaged); retry.")
        return commit_staged(staging, dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
