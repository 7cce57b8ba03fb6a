"""Checkpoint references: the one syntax of every command that names a checkpoint.

``dylora train --resume`` (and ``--resume_from_checkpoint``, ``--start_from``,
``--wandb_checkpoint_artifact``), ``dylora submit``, ``dylora ckpt list|show|verify``, and
``--model`` of ``dylora eval``, ``dylora generate`` and ``dylora report routing`` all parse with
:func:`parse_reference` and fetch with :func:`fetch` (or :func:`fetch_model`). Accepted forms,
first match wins:

``auto``
    The newest complete checkpoint of this run (``--resume`` only): locally under
    ``RUN_DIR/checkpoints`` first, then in the configured store. The caller handles it with
    ``find_auto(run_dir, store)``, which returns a reference of another form, or None (a fresh start).
``latest``
    The newest complete checkpoint under ``RUN_DIR/checkpoints`` (``run_dir`` must be given).
``wandb://ENTITY/PROJECT/NAME[:ALIAS]``
    A W&B artifact version; ALIAS is a version (``v3``) or alias (``latest``, ``best``,
    ``step-120``) and defaults to ``latest``.
``SCHEME://PATH:ALIAS`` with SCHEME one of :data:`URL_SCHEMES` (``s3``, ``gs``, ``file``, ...)
    A store prefix plus a version or alias, e.g. ``s3://bucket/run1/store:latest`` or
    ``file:///runs/run1/store:v3``. The suffix is recognised when the URL's last path segment
    contains ``:``.
``SCHEME://PATH``
    One checkpoint folder directly (it must hold ``manifest.json``).
``DIR:ALIAS`` where DIR is a local directory, e.g. ``runs/run1/store:latest``
    A version or alias of the local store in DIR.
``ENTITY/PROJECT/NAME:ALIAS`` where no local directory ENTITY/PROJECT/NAME exists
    The seed's bare W&B artifact form: the same as ``wandb://ENTITY/PROJECT/NAME:ALIAS``.
    Through ``--wandb_checkpoint_artifact`` (``bare_is_wandb=True``) only the W&B forms are
    accepted, and a local directory of that name does not count.
``DIR:ALIAS`` otherwise (a path of another shape, e.g. absolute)
    A local store that does not exist: fetching it says so.
anything else
    A local path: a checkpoint directory (has ``manifest.json``), a run directory (its newest
    complete checkpoint under ``checkpoints/``) or a checkpoints directory itself.

A local path that does not exist stays a path (fetching it says it does not exist), so
``--model`` can tell a model name (``gpt2``, ``ORG/NAME``) from a checkpoint reference.

``fetch(ref, dest_root)`` returns a verified local checkpoint directory: local checkpoints are
verified in place; remote ones are downloaded under ``dest_root`` (a folder named after the
reference and version, reused when it already holds a verified copy), with retries for stores
that cannot be reached, all under one deadline. A checkpoint without its manifest (its commit
record) is never chosen.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .directory import latest_checkpoint, list_checkpoints
from .format import is_complete, verify_checkpoint
from .stores import CheckpointStore, StoreUnreachableError, open_store
from .stores.base import ALIAS_RE, version_number
from .stores.deadline import DEFAULT_FETCH_TIMEOUT_S, Deadline, retry_within
from .stores.fsspec_store import PROTOCOLS as URL_SCHEMES

log = logging.getLogger(__name__)

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_BARE_RE = re.compile(r"^([^/\s:]+)/([^/\s:]+)/([^/\s:]+):([^/\s:]+)$")
SYNTAX = ("accepted forms: auto, latest, a local directory (checkpoint, run or checkpoints directory), "
          "DIR:ALIAS (a local store directory, e.g. runs/RUN_ID/store:latest), "
          "wandb://ENTITY/PROJECT/NAME[:ALIAS], ENTITY/PROJECT/NAME:ALIAS (W&B, the seed's form), "
          + " ".join(f"{s}://" for s in URL_SCHEMES) + " URLs of a checkpoint folder, or of a store "
          "followed by :ALIAS (e.g. s3://bucket/run1/store:latest); ALIAS is a version (v3) or an "
          "alias (latest, best, step-120)")


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``kind``: auto, latest, path, store, wandb or url.

    ``location``: the local path (``path``), the local store directory (``store``), the store
    address (``wandb://E/P/NAME``, a store prefix URL) or, for a ``url`` with ``alias`` None, the
    checkpoint folder URL itself.
    """

    raw: str
    kind: str
    location: str = ""
    alias: str | None = None

    @property
    def is_local(self) -> bool:
        """Whether it names something on this machine's file system (not a store URL or W&B)."""
        return self.kind in ("latest", "path", "store")

    @property
    def canonical(self) -> str:
        """The reference in its explicit form: ``wandb://E/P/NAME:ALIAS`` for the bare W&B form."""
        return f"{self.location}:{self.alias}" if self.alias is not None else (self.location or self.kind)


class MalformedReference(CheckpointError):
    """A reference that does not parse: bad input (exit status 2), not a failed fetch."""

    exit_code = 2


def _bad(ref: str, why: str) -> CheckpointError:
    return MalformedReference(f"Checkpoint reference {ref!r} is malformed: {why}; {SYNTAX}.")


def _check_alias(ref: str, alias: str) -> str:
    if not ALIAS_RE.match(alias):
        raise _bad(ref, f"{alias!r} is not a version (v3) or alias (latest, best, step-120)")
    return alias


def parse_reference(ref: str, *, bare_is_wandb: bool = False) -> Reference:
    """Parse ``ref`` without touching any store (see the module docstring for the syntax).

    The local file system is looked at once: ``DIR:ALIAS`` names a local store when DIR is a
    local directory, and the seed's bare W&B artifact otherwise.
    """
    raw = ref
    ref = (ref or "").strip()
    if not ref:
        raise _bad(raw, "it is empty")
    if ref in ("auto", "latest"):
        return Reference(raw, ref)
    url = _URL_RE.match(ref)
    if url and url.group(1) == "wandb":
        body, colon, alias = url.group(2).partition(":")
        return _wandb(raw, body, alias if colon else "latest")
    if url:
        scheme, path = url.group(1).lower(), url.group(2)
        if scheme not in URL_SCHEMES:
            raise _bad(raw, f"the scheme {scheme}:// is not supported")
        head, _, last = path.rstrip("/").rpartition("/")
        if not path.strip("/"):
            raise _bad(raw, "the URL has no bucket or path")
        if ":" in last:
            name, _, alias = last.rpartition(":")
            location = f"{scheme}://{head}/{name}" if head else f"{scheme}://{name}"
            return Reference(raw, "url", location.rstrip("/"), _check_alias(raw, alias))
        return Reference(raw, "url", f"{scheme}://{path}".rstrip("/"))
    if bare_is_wandb:
        bare = _BARE_RE.match(ref)
        if not bare:
            raise _bad(raw, "--wandb_checkpoint_artifact expects ENTITY/PROJECT/NAME:vN or "
                            "ENTITY/PROJECT/NAME:latest")
        return _wandb(raw, ref.rpartition(":")[0], bare.group(4))
    head, colon, alias = ref.rpartition(":")
    if not colon or "/" in alias or Path(ref).expanduser().exists():
        return Reference(raw, "path", ref)  # a local path (one whose name holds ':' included)
    if not head.strip("/"):
        raise _bad(raw, f"nothing before ':{alias}' names a store (write DIR:{alias or 'ALIAS'}, "
                        f"e.g. runs/RUN_ID/store:{alias or 'latest'})")
    _check_alias(raw, alias)
    store_dir = head.rstrip("/") or "/"
    if not Path(store_dir).expanduser().is_dir() and _BARE_RE.match(ref):
        return _wandb(raw, head, alias)
    return Reference(raw, "store", store_dir, alias)


def _wandb(raw: str, body: str, alias: str) -> Reference:
    parts = body.strip("/").split("/")
    if len(parts) != 3 or not all(parts):
        raise _bad(raw, "a W&B reference names ENTITY/PROJECT/NAME (three parts)")
    return Reference(raw, "wandb", "wandb://" + "/".join(parts), _check_alias(raw, alias))


def find_auto(run_dir: Path | None, store: CheckpointStore | None) -> str | None:
    """``auto``: the newest complete checkpoint of this run, locally first, then in ``store``.

    Returns a reference for ``fetch`` or None when there is none (the caller starts fresh and
    says so). A store that cannot be reached raises CheckpointError: that is not "none".
    """
    if run_dir is not None:
        local = latest_checkpoint(Path(run_dir) / "checkpoints")
        if local is not None:
            return str(local)
    if store is None:
        return None
    versions = [v for v in store.list_versions() if v.step is not None]
    if not versions:
        return None
    newest = max(versions, key=lambda v: (v.step, version_number(v.version)))
    return store.ref_for(newest.version)


def _local(ref: Reference, run_dir: Path | None) -> Path:
    if ref.kind == "latest" and run_dir is None:
        raise CheckpointError("'latest' needs a run directory; give the run directory itself, "
                              "a checkpoint directory, or the run's store (RUN_DIR/store:latest) instead.")
    path = Path(run_dir) if ref.kind == "latest" else Path(ref.location).expanduser()
    if is_complete(path):
        return path
    if not path.is_dir():
        raise CheckpointError(f"the local directory {path} does not exist.")
    for parent in (path / "checkpoints", path):
        newest = latest_checkpoint(parent)
        if newest is not None:
            return newest
    raise CheckpointError(
        f"{path} is neither a complete checkpoint nor a directory holding one (a checkpoint is "
        "complete when it has manifest.json; interrupted writes have none). Give a checkpoint "
        "directory, a run directory with checkpoints/, or a store with :ALIAS (RUN_DIR/store:latest).")


def holds_checkpoints(path: Path) -> bool:
    """Whether a local directory is a checkpoint, a run directory (``checkpoints/``) or a
    directory of complete checkpoints, rather than, say, a saved model."""
    path = Path(path).expanduser()
    return is_complete(path) or (path / "checkpoints").is_dir() or bool(list_checkpoints(path))


def _dest_name(location: str, version: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", location.split("://", 1)[-1]).strip("_")[-80:]
    digest = hashlib.sha256(location.encode()).hexdigest()[:8]
    return f"{slug}-{digest}-{version}"


def _download(ref: Reference, dest_root: Path, storage_options: dict[str, Any] | None,
              wandb_api: Any, timeout_s: float | None) -> Path:
    if ref.kind == "store" and not Path(ref.location).expanduser().is_dir():
        raise CheckpointError(f"the local store directory {ref.location} does not exist.")
    store = open_store(ref.location, storage_options=storage_options, wandb_api=wandb_api,
                       timeout_s=timeout_s)
    if ref.alias is None:  # a checkpoint folder URL
        return store.download_folder("", Path(dest_root) / _dest_name(store.url, "folder"))
    version = store.resolve(ref.alias)
    return store.download(version, Path(dest_root) / _dest_name(store.url, version))


def _read_as(ref: Reference) -> str:
    """How a bare ``E/P/NAME:ALIAS`` was read, for error messages (it may have meant a local store)."""
    if ref.kind != "wandb" or ref.raw.strip().startswith("wandb://"):
        return ""
    return (f" ({ref.raw.strip()!r} was read as the W&B artifact {ref.canonical}: no local directory "
            f"{ref.raw.strip().rpartition(':')[0]} exists)")


def fetch(ref: str, dest_root: Path, *, run_dir: Path | None = None, bare_is_wandb: bool = False,
          storage_options: dict[str, Any] | None = None, wandb_api: Any = None,
          timeout_s: float | None = None, retries: int = 2, backoff_s: float = 1.0) -> Path:
    """A verified local checkpoint directory for ``ref`` (see the module docstring).

    A stored checkpoint is fetched under one deadline, retries included: ``timeout_s`` (default
    ``DEFAULT_FETCH_TIMEOUT_S``) to reach the store and learn what to download, plus one second per
    MB of the checkpoint for the transfer. Stores that cannot be reached are retried up to
    ``retries`` times with exponential back-off while the deadline leaves time; a call that stalls
    is logged while it lasts. Every failure is a CheckpointError naming the reference and the cause.
    """
    parsed = parse_reference(ref, bare_is_wandb=bare_is_wandb)
    if parsed.kind == "auto":
        raise CheckpointError("Checkpoint reference 'auto' is resolved by the caller: use "
                              "find_auto(run_dir, store) and fetch the reference it returns.")
    deadline = Deadline(DEFAULT_FETCH_TIMEOUT_S if timeout_s is None else timeout_s, f"store {parsed.location}")
    try:
        if parsed.kind in ("latest", "path"):
            path = _local(parsed, run_dir)
            verify_checkpoint(path)
            return path
        return retry_within(deadline, lambda: _download(parsed, dest_root, storage_options, wandb_api, timeout_s),
                            deadline.what, retryable=lambda e: isinstance(e, StoreUnreachableError),
                            backoff_s=backoff_s, max_attempts=retries + 1)
    except StoreUnreachableError as e:
        raise CheckpointError(f"Cannot fetch checkpoint {ref!r} after {deadline.attempts} attempt(s): "
                              f"{e}{_read_as(parsed)}") from e
    except CheckpointError as e:
        raise CheckpointError(f"Cannot fetch checkpoint {ref!r}: {e}{_read_as(parsed)}") from e


def fetch_model(ref: str, dest_root: Path, *, run_dir: Path | None = None) -> Path | None:
    """``--model REF`` (eval, generate, report routing): the verified checkpoint REF names, or None.

    None means REF is a local path that names no checkpoint: a directory that is neither a
    checkpoint, a run directory nor a directory of checkpoints (a saved model, such as a run's
    ``final/`` or a base model), or a path that does not exist (a model name such as a hub id).
    The caller loads those as a model. Every other reference is fetched and verified as
    ``--resume`` does it; a malformed one raises :class:`MalformedReference`.
    """
    parsed = parse_reference(ref)
    if parsed.kind == "auto":
        raise _bad(ref, "'auto' means this training run's newest checkpoint and belongs to --resume")
    if parsed.kind == "path" and not holds_checkpoints(Path(parsed.location)):
        return None
    return fetch(ref, dest_root, run_dir=run_dir)
