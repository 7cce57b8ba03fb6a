"""The version/alias layout shared by the directory-like backends (local, fsspec).

``ObjectCheckpointStore`` implements the store verbs once over a handful of object primitives
(list, size, read, write, upload, download, delete), so a backend is a short file. Its layout::

    ROOT/v0/<payload files>, ROOT/v0/manifest.json     one folder per version
    ROOT/aliases/latest.json                           {"version": "v0", "step": 120, ...}

Publishing verifies the local checkpoint, claims the next unused version number (a version
folder that already exists, even a half-uploaded one, is never reused), uploads the payload and
then ``manifest.json``, checks the stored size of every file, and only then writes the alias
pointer files. A version without ``manifest.json`` is incomplete: it is neither listed nor
resolvable. ``latest`` never moves back to a smaller step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from abc import abstractmethod
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from ...errors import CheckpointError
from ..format import MANIFEST_NAME, Manifest, checkpoint_name, verify_checkpoint
from .base import (
    DEFAULT_ALIASES,
    VERSION_RE,
    CheckpointStore,
    StoreUnreachableError,
    VersionInfo,
    check_ref_name,
    publish_aliases,
    version_number,
)
from .download import install_download

log = logging.getLogger(__name__)

ALIASES_DIR = "aliases"


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
        # the checkpoint's name, not local_dir: that is the publisher's snapshot of it (.tmp-publishing-...)
        log.info("Published %s to %s as %s (aliases %s)", checkpoint_name(step), self.url, version, names)
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
