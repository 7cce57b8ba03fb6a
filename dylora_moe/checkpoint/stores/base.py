"""The store interface: what every backend offers, and the names it accepts.

A store keeps published checkpoints as immutable versions ``v0, v1, ...`` and movable aliases
(``latest``, ``best``, ``step-N``) that point at versions. Four verbs, after Composer's object
stores: ``publish``, ``resolve``, ``download``, ``list_versions`` (plus ``ref_for``, the
reference string that names a version of this store in ``references.fetch``, and ``probe``).

The directory-like backends share one layout (``object_store.ObjectCheckpointStore``); every
backend downloads through ``download.install_download``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ...errors import CheckpointError

VERSION_RE = re.compile(r"^v(\d+)$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
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


