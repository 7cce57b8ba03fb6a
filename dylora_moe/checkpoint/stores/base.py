"""The store interface, and the version/alias layout shared by the directory-like backends.

A store keeps published checkpoints as immutable versions ``v0, v1, ...`` and movable aliases
(``latest``, ``best``, ``step-N``) that point at versions. Four verbs, after Composer's object
stores: ``publish``, ``resolve``, ``download``, ``list_versions`` (plus ``ref_for``, the
reference string that names a version of this store in ``references.fetch``).

``ObjectCheckpointStore`` implements the verbs once over a handful of object primitives
(list, size, read, write, upload, download), so a backend is a short file. Its layout::

    ROOT/v0/<payload files>, ROOT/v0/manifest.json     one folder per version
    ROOT/aliases/latest.json                           {"version": "v0", "step": 120, ...}

Publishing verifies the local checkpoint, claims the next unused version number (a version
folder that already exists, even a half-uploaded one, is never reused), uploads the payload and
then ``manifest.json``, checks the stored size of every file, and only then writes the alias
pointer files. A version without ``manifest.json`` is incomplete: it is neither listed nor
resolvable. ``latest`` never moves back to a smaller step.

Downloads go through ``install_download``: free disk space is checked first, files land in a
``.tmp-*`` staging directory, every checksum is verified against the manifest, and only then is
the directory renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from dylora_moe.checkpoint.format import (MANIFEST_NAME, Manifest, commit_staged, hash_file,
                                          is_complete, make_staging_dir, read_manifest,
                                          verify_checkpoint)
from dylora_moe.errors import CheckpointError

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v(\d+)$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ALIASES_DIR = "aliases"
DEFAULT_ALIASES = ("latest",)


class StoreUnreachableError(CheckpointError):
    """The store could not be reached or an I/O call to it failed: worth retrying later."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    step: int | None
    aliases: tuple[str, ...]
    size: int | None
    created: str | None


def check_ref_name(ref: str, store: str) -> str:
    """Accept a version (``v3``) or an alias name; anything else is a CheckpointError."""
    if not isinstance(ref, str) or not ALIAS_RE.match(ref):
        raise CheckpointError(f"{ref!r} is not a valid version or alias for store {store}; use a "
                              "version like 'v3' or an alias of letters, digits, '_', '.', '-' "
                              "such as 'latest', 'best' or 'step-120'.")
    return ref


def publish_aliases(step: int, aliases: Iterable[str], store: str) -> list[str]:
    """The aliases a publish sets: the requested ones plus ``step-N``, validated, in order."""
    names = []
    for alias in [*aliases, f"step-{int(step)}"]:
        check_ref_name(alias, store)
        if VERSION_RE.match(alias):
            raise CheckpointError(f"Alias {alias!r} looks like a version name; versions are "
                                  f"numbered by store {store} itself, choose another alias.")
        if alias not in names:
            names.append(alias)
    return names


def version_number(version: str) -> int:
    match = VERSION_RE.match(version)
    return int(match.group(1)) if match else -1


def check_free_space(dest_dir: Path, needed: int, label: str) -> None:
    """Refuse to download ``needed`` bytes where the filesystem of ``dest_dir`` lacks room."""
    probe = Path(dest_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
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


class CheckpointStore(ABC):
    """Where published checkpoints live. ``url`` names the store in messages and references."""

    url: str

    @abstractmethod
    def publish(self, local_dir: Path, step: int, aliases: Sequence[str] = DEFAULT_ALIASES) -> str:
        """Upload a verified local checkpoint as a new version, then move ``aliases`` and
        ``step-N`` to it; return the version name."""

    @abstractmethod
    def resolve(self, ref: str) -> str:
        """The version name for an alias or version (``latest``, ``best``, ``step-120``, ``v3``)."""

    @abstractmethod
    def download(self, ref: str, dest_dir: Path) -> Path:
        """Fetch version/alias ``ref`` into the new directory ``dest_dir``, verified."""

    @abstractmethod
    def list_versions(self) -> list[VersionInfo]:
        """Complete versions, oldest first."""

    def ref_for(self, version: str) -> str:
        """A reference string for ``references.fetch`` that names ``version`` of this store."""
        return f"{self.url}:{version}"

    def probe(self) -> None:
        """Cheaply check that the store can work (see ``probe.probe_store``); raises if not."""
        self.list_versions()


class ObjectCheckpointStore(CheckpointStore):
    """Versions as folders and aliases as pointer files, over a few object primitives.

    Keys are '/'-separated and relative to the store root ('' is the root itself).
    """

    # --- primitives a backend provides -------------------------------------------------------
    @abstractmethod
    def _list(self, key: str) -> list[str]:
        """Names of the children of ``key``; [] when it does not exist."""

    @abstractmethod
    def _size(self, key: str) -> int | None:
        """Size of the object ``key``; None when it does not exist."""

    @abstractmethod
    def _read(self, key: str) -> bytes | None:
        """Content of the object ``key``; None when it does not exist."""

    @abstractmethod
    def _write(self, key: str, data: bytes) -> None:
        """Store a small object; a reader sees the old or new content, never a partial one."""

    @abstractmethod
    def _upload(self, local_path: Path, key: str) -> None: ...

    @abstractmethod
    def _download(self, key: str, local_path: Path) -> None: ...

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Remove the object ``key`` (used by ``probe`` only: versions are never deleted)."""

    def _claim(self, version: str) -> bool:
        """Reserve an unused version folder; False if someone else has it."""
        return not self._list(version)

    # --- the verbs ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:
            raise StoreUnreachableError(
                f"Store {self.url} failed while {action}: {type(e).__name__}: {e}. Check the "
                "store's address and credentials, or retry later.") from e

    def publish(self, local_dir: Path, step: int, aliases: Sequence[str] = DEFAULT_ALIASES) -> str:
        local_dir = Path(local_dir)
        manifest = verify_checkpoint(local_dir)
        if manifest.global_step != step:
            raise CheckpointError(f"Cannot publish {local_dir} as step {step}: its manifest says "
                                  f"global_step {manifest.global_step}.")
        names = publish_aliases(step, aliases, self.url)
        with self._errors(f"creating a new version for {local_dir}"):
            version = self._claim_next_version()
        for rel in [*sorted(manifest.files), MANIFEST_NAME]:  # the manifest (commit) last
            key, want = f"{version}/{rel}", (local_dir / rel).stat().st_size
            with self._errors(f"uploading {rel} of {local_dir} to version {version} (the version "
                              "stays incomplete and no alias was moved)"):
                self._upload(local_dir / rel, key)
                got = self._size(key)
            if got != want:
                raise StoreUnreachableError(
                    f"Store {self.url}: {key} has {got} bytes after upload, expected {want}; "
                    f"version {version} stays incomplete and no alias was moved.")
        with self._errors(f"moving aliases {names} to {version}"):
            for alias in names:
                self._move_alias(alias, version, step)
        log.info("Published %s to %s as %s (aliases %s)", local_dir, self.url, version, names)
        return version

    def probe(self) -> None:
        """Write, read back and delete a small object (``.probe-*``: never a version or alias)."""
        key, data = f".probe-{secrets.token_hex(6)}", b"dylora-moe store probe\n"
        self._write(key, data)
        try:
            if self._read(key) != data:
                raise StoreUnreachableError(f"Store {self.url}: a probe object read back differently.")
        finally:
            self._delete(key)
        self._list("")

    def _claim_next_version(self) -> str:
        numbers = [version_number(name) for name in self._list("")]
        number = max(numbers, default=-1) + 1
        while not self._claim(f"v{number}"):
            number += 1
        return f"v{number}"

    def _move_alias(self, alias: str, version: str, step: int) -> None:
        if alias == "latest":
            current = self._pointer("latest")
            if current and isinstance(current.get("step"), int) and current["step"] > step:
                log.warning("Not moving 'latest' of %s from step %s back to step %s",
                            self.url, current["step"], step)
                return
        pointer = {"version": version, "step": step,
                   "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._write(f"{ALIASES_DIR}/{alias}.json", json.dumps(pointer).encode())

    def _pointer(self, alias: str) -> dict | None:
        data = self._read(f"{ALIASES_DIR}/{alias}.json")
        if data is None:
            return None
        try:
            pointer = json.loads(data)
            return pointer if isinstance(pointer, dict) else None
        except ValueError:
            log.warning("Ignoring unreadable alias pointer %s of %s", alias, self.url)
            return None

    def _is_complete(self, version: str) -> bool:
        return self._size(f"{version}/{MANIFEST_NAME}") is not None

    def _aliases(self) -> dict[str, str]:
        names = [n[:-5] for n in self._list(ALIASES_DIR) if n.endswith(".json")]
        pointers = {name: self._pointer(name) for name in names}
        return {name: p["version"] for name, p in pointers.items() if p and "version" in p}

    def _available(self) -> str:
        try:
            versions = [v.version for v in self.list_versions()]
            aliases = sorted(self._aliases())
        except CheckpointError:
            return "the store could not be listed"
        return f"available versions: {versions or 'none'}; aliases: {aliases or 'none'}"

    def resolve(self, ref: str) -> str:
        check_ref_name(ref, self.url)
        with self._errors(f"resolving {ref!r}"):
            version = ref if VERSION_RE.match(ref) else (self._pointer(ref) or {}).get("version")
            if version and self._is_complete(version):
                return version
        what = (f"alias {ref!r} points to {version!r}, which is missing or incomplete" if version
                and version != ref else f"{ref!r} is not a complete version or alias")
        raise CheckpointError(f"Store {self.url}: {what}; {self._available()}.")

    def list_versions(self) -> list[VersionInfo]:
        with self._errors("listing versions"):
            by_version: dict[str, list[str]] = {}
            for alias, version in sorted(self._aliases().items()):
                by_version.setdefault(version, []).append(alias)
            infos = []
            for name in sorted(self._list(""), key=version_number):
                data = self._read(f"{name}/{MANIFEST_NAME}") if VERSION_RE.match(name) else None
                if data is None:
                    continue
                manifest = Manifest.from_json(data, source=f"{self.url}/{name}/{MANIFEST_NAME}")
                infos.append(VersionInfo(name, manifest.global_step,
                                         tuple(by_version.get(name, ())), manifest.total_size,
                                         manifest.created_at))
        return infos

    def download(self, ref: str, dest_dir: Path) -> Path:
        return self.download_folder(self.resolve(ref), dest_dir)

    def download_folder(self, folder: str, dest_dir: Path) -> Path:
        """Download the checkpoint folder ``folder`` ('' for the store root itself), verified."""
        label = f"{self.url}/{folder}" if folder else self.url
        prefix = f"{folder}/" if folder else ""
        with self._errors(f"reading {label}/{MANIFEST_NAME}"):
            data = self._read(prefix + MANIFEST_NAME)
        if data is None:
            raise CheckpointError(f"{label} has no {MANIFEST_NAME}: it is not a complete "
                                  "checkpoint (an interrupted upload leaves none).")
        manifest = Manifest.from_json(data, source=f"{label}/{MANIFEST_NAME}")

        def fill(staging: Path) -> None:
            for rel in sorted(manifest.files):
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                self._download(prefix + rel, staging / rel)
            (staging / MANIFEST_NAME).write_bytes(data)

        return install_download(dest_dir, fill, label, expected=manifest)
