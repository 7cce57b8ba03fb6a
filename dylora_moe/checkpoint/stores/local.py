"""A store in a local directory (``RUN_DIR/store`` by default).

Versions are folders ``v0/``, ``v1/``; aliases are small JSON pointer files
``aliases/latest.json`` replaced atomically (temporary file, fsync, ``os.replace``). A version
number is claimed with an exclusive ``mkdir``, so two publishers never share one. The same
layout is readable through ``file://`` URLs, which is what ``ref_for`` returns.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from ..commit import fsync_path
from .object_store import ObjectCheckpointStore


class LocalStore(ObjectCheckpointStore):
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()

    @classmethod
    def for_run_dir(cls, run_dir: Path) -> "LocalStore":
        return cls(Path(run_dir) / "store")

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def _list(self, key: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(key)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def _read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def _replace_with(self, key: str, fill) -> None:
        """Write through a temporary sibling, fsync, and rename over ``key``."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
        try:
            fill(tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(path.parent)

    def _write(self, key: str, data: bytes) -> None:
        self._replace_with(key, lambda tmp: tmp.write_bytes(data))

    def _upload(self, local_path: Path, key: str) -> None:
        self._replace_with(key, lambda tmp: shutil.copyfile(local_path, tmp))

    def _download(self, key: str, local_path: Path) -> None:
        shutil.copyfile(self._path(key), local_path)

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _claim(self, version: str) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._path(version).mkdir()
            return True
        except FileExistsError:
            return False
