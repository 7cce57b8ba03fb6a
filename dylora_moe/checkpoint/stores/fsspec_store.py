"""A store at any fsspec URL: ``file://``, ``memory://``, ``s3://``, ``gs://``.

Same layout as the local store (version folders, alias pointer files written last). S3 goes
through ``s3fs`` and honours ``AWS_ENDPOINT_URL`` (or ``client_kwargs={"endpoint_url": ...}``
in the storage options) for S3-compatible servers; ``gs://`` needs ``gcsfs``, which is an
optional extra. Object stores replace a whole object on PUT, so pointer files are atomic there;
on ``file://`` they are written to a temporary name and moved. Listings bypass fsspec's
directory cache, since another process may have published meanwhile. Object stores have no
exclusive create here, so two publishers racing on one prefix could pick the same version
number: give each run its own prefix (only its rank 0 publishes).
"""

from __future__ import annotations

import logging
import os
import posixpath
import secrets
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ...errors import CheckpointError
from .object_store import ObjectCheckpointStore

PROTOCOLS = ("file", "memory", "s3", "gs", "gcs")
_GCSFS = "gcsfs (pip install gcsfs: the gcs extra)"
_EXTRAS = {"s3": "s3fs (pip install s3fs: the s3 extra)", "gs": _GCSFS, "gcs": _GCSFS}


def _options(protocol: str, storage_options: dict[str, Any] | None,
             timeout_s: float | None) -> dict[str, Any]:
    options = dict(storage_options or {})
    if protocol == "file":
        options.setdefault("auto_mkdir", True)
    if protocol == "s3":
        client = dict(options.get("client_kwargs") or {})
        if os.environ.get("AWS_ENDPOINT_URL") and "endpoint_url" not in options:
            client.setdefault("endpoint_url", os.environ["AWS_ENDPOINT_URL"])
        options["client_kwargs"] = client
        if timeout_s is not None:
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("connect_timeout", timeout_s)
            config.setdefault("read_timeout", timeout_s)
            config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})  # we retry ourselves
            options["config_kwargs"] = config
    return options


class _OrphanedUploadWrites(logging.Filter):
    """Drops asyncio's 'Task exception was never retrieved' for aiohttp's ``write_bytes`` on a reset
    connection. With ``Expect: 100-continue`` (S3 uploads), aiohttp 3.x sends the headers outside the
    ``try`` that hands write errors to the request, so a connection reset there also leaves this
    orphaned task error: a traceback in the log although the request itself fails, is retried and
    reported like any other store error."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and type(error).__name__ == "ClientConnectionResetError"
                    and "write_bytes" in record.getMessage())


_ORPHANED_UPLOAD_WRITES = _OrphanedUploadWrites()


class FsspecStore(ObjectCheckpointStore):
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 timeout_s: float | None = None):
        protocol = url.split("://", 1)[0] if "://" in url else ""
        if protocol not in PROTOCOLS:
            raise CheckpointError(f"Store URL {url!r} has an unsupported scheme; accepted: "
                                  + ", ".join(f"{p}://" for p in PROTOCOLS) + ".")
        if protocol in ("s3", "gs", "gcs"):  # aiohttp underneath (idempotent: a filter is added once)
            logging.getLogger("asyncio").addFilter(_ORPHANED_UPLOAD_WRITES)
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(
                self.url, **_options(protocol, storage_options, timeout_s))
        except ImportError as e:
            raise CheckpointError(f"Store URL {url!r} needs the package "
                                  f"{_EXTRAS.get(protocol, protocol)}, which is not installed "
                                  f"({e}).") from e
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"Cannot open store {url!r}: {e}.") from e
        self.root = self.root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _list(self, key: str) -> list[str]:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _size(self, key: str) -> int | None:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def _read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if isinstance(self.fs, LocalFileSystem):  # make the replacement atomic
            parent, name = posixpath.split(path)
            tmp = f"{parent}/.tmp-{name}-{secrets.token_hex(4)}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def _upload(self, local_path: Path, key: str) -> None:
        self.fs.put_file(str(local_path), self._path(key))

    def _download(self, key: str, local_path: Path) -> None:
        self.fs.get_file(self._path(key), str(local_path))

    def _delete(self, key: str) -> None:
        self.fs.rm_file(self._path(key))
