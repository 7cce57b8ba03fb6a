"""A store on Weights & Biases artifacts.

Each checkpoint becomes a new version of the artifact ``<run_id>-checkpoint`` (type ``model``),
logged through the active run with ``run.log_artifact(artifact, aliases=[...])`` and waited for.
W&B numbers versions itself and attaches the aliases when the version is committed, i.e. after
all its files are uploaded, so ``latest`` never points at a half-uploaded version. In offline
mode the artifact is only staged (``wandb sync`` uploads it later) and has no version number
yet: ``publish`` then returns the alias ``step-N`` that will name it.

Reading goes through ``wandb.Api().artifact("ENTITY/PROJECT/NAME:ALIAS")``. The W&B client does
not verify downloads (and serves cache hits by file size only), so every download is verified
against our own manifest before it is renamed into place. ``skip_cache=True`` is never used:
in wandb 0.31.0 it leaves a process-wide override that corrupts later downloads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from ...errors import CheckpointError
from ..format import MANIFEST_NAME, checkpoint_name, hash_file, verify_checkpoint
from .base import (
    DEFAULT_ALIASES,
    CheckpointStore,
    StoreUnreachableError,
    VersionInfo,
    check_ref_name,
    publish_aliases,
    version_number,
)
from .download import install_download

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "model"
FINAL_BEST_NAME = "best-dylora-model-full"  # the seed's artifact name, kept for compatibility


def _wandb():
    try:
        import wandb
    except ImportError as e:
        raise CheckpointError("W&B checkpoints need the wandb package, which is not installed; "
                              "install it with pip install wandb (the wandb extra).") from e
    return wandb


def _login_refused(error: BaseException) -> bool:
    """No API key, or one the server refused (HTTP 401/403). wandb 0.31 raises the same
    ``AuthenticationError`` when the server cannot be reached at all; that one is worth a retry."""
    if type(error).__name__ == "UsageError":
        return True
    if type(error).__name__ != "AuthenticationError":
        return False
    response = getattr(error.__cause__, "response", None)  # the client's WandbApiFailedError
    return getattr(response, "http_status", None) in (401, 403)


class WandbStore(CheckpointStore):
    """Versions of the artifact ``ENTITY/PROJECT/NAME``; ``run`` is needed to publish only.

    ``api`` replaces ``wandb.Api(timeout=timeout_s)`` (tests pass a fake); ``wait=False``
    returns right after ``log_artifact`` without waiting for the upload.
    """

    def __init__(self, entity: str, project: str, name: str, *, run: Any = None,
                 api: Any = None, timeout_s: int | None = None, wait: bool = True):
        self.entity, self.project, self.name = entity, project, name
        self.url = f"wandb://{entity}/{project}/{name}"
        self.run, self._api_obj, self.timeout_s, self.wait = run, api, timeout_s, wait

    @classmethod
    def for_run(cls, run: Any, **kwargs: Any) -> "WandbStore":
        """The checkpoint store of an active run: artifact ``<run_id>-checkpoint``."""
        return cls(run.entity, run.project, f"{run.id}-checkpoint", run=run, **kwargs)

    def _api(self) -> Any:
        if self._api_obj is None:
            try:
                self._api_obj = _wandb().Api(timeout=self.timeout_s)
            except CheckpointError:
                raise
            except Exception as e:  # no credentials is not worth a retry; a network error is
                if _login_refused(e):
                    raise CheckpointError(
                        f"Cannot reach W&B for {self.url}: {type(e).__name__}: {e}. Log in (wandb "
                        "login or WANDB_API_KEY), check WANDB_BASE_URL, or retry later.") from e
                raise StoreUnreachableError(
                    f"Cannot reach W&B for {self.url}: {type(e).__name__}: {e}. Check WANDB_BASE_URL "
                    "and the network, or retry later.") from e
        return self._api_obj

    def _log(self, name: str, source: Path, step: int, aliases: list[str],
             metadata: dict[str, Any]) -> str:
        if self.run is None:
            raise CheckpointError(f"Publishing to {self.url} needs an active W&B run; create the "
                                  "store with WandbStore.for_run(run).")
        artifact = _wandb().Artifact(name, type=ARTIFACT_TYPE, metadata={"step": step, **metadata})
        artifact.add_dir(str(source))
        logged = self.run.log_artifact(artifact, aliases=aliases)
        if getattr(self.run, "offline", False) or not self.wait:
            return f"step-{step}"
        try:
            return logged.wait(timeout=self.timeout_s).version
        except Exception as e:
            raise StoreUnreachableError(f"Uploading {source} to W&B artifact {name} failed or "
                                        f"timed out: {type(e).__name__}: {e}.") from e

    def publish(self, local_dir: Path, step: int, aliases: Sequence[str] = DEFAULT_ALIASES) -> str:
        return self._publish_checkpoint(self.name, local_dir, step, aliases)

    def _publish_checkpoint(self, name: str, local_dir: Path, step: int, aliases: Sequence[str]) -> str:
        names = publish_aliases(step, aliases, self.url)
        manifest = verify_checkpoint(local_dir)
        if manifest.global_step != step:
            raise CheckpointError(f"Cannot publish {local_dir} as step {step}: its manifest says "
                                  f"global_step {manifest.global_step}.")
        version = self._log(name, Path(local_dir), step, names, {
            "size": manifest.total_size, "format_version": manifest.format_version,
            "manifest_sha256": hash_file(Path(local_dir) / MANIFEST_NAME)[0]})
        log.info("Published %s to wandb://%s/%s/%s as %s (aliases %s)", checkpoint_name(step), self.entity,
                 self.project, name, version, names)
        return version

    def publish_final_best(self, local_dir: Path, step: int) -> str:
        """Also log the best checkpoint ``local_dir`` as the seed-compatible artifact
        ``best-dylora-model-full`` (aliases ``latest``, ``best``, ``step-N``).

        It is a checkpoint like every other version (verified, with its manifest), so the seed's
        ``--wandb_checkpoint_artifact ENTITY/PROJECT/best-dylora-model-full:latest`` resumes from
        it. The exported model (``final/``) is not uploaded: it has no manifest, so a download of
        it could not be verified nor resumed from; it stays in the run directory.
        """
        return self._publish_checkpoint(FINAL_BEST_NAME, local_dir, step, ["latest", "best"])

    def probe(self) -> None:
        """An active run has already reached W&B (or is offline); otherwise the API must answer."""
        if self.run is None:
            self._api()

    def _artifact(self, ref: str) -> Any:
        check_ref_name(ref, self.url)
        full = f"{self.entity}/{self.project}/{self.name}:{ref}"
        api = self._api()
        try:
            return api.artifact(full, type=ARTIFACT_TYPE)
        except Exception as e:
            try:
                versions = self.list_versions()
            except StoreUnreachableError as unreachable:  # not "missing": W&B is unreachable
                raise StoreUnreachableError(f"W&B artifact {full} cannot be fetched "
                                            f"({type(e).__name__}: {e}); {unreachable}") from e
            available = ", ".join(f"{v.version} {list(v.aliases)}" for v in versions) or "none"
            raise CheckpointError(f"W&B artifact {full} cannot be found ({type(e).__name__}: "
                                  f"{e}); available versions of {self.url}: {available}.") from e

    def resolve(self, ref: str) -> str:
        return self._artifact(ref).version

    def download(self, ref: str, dest_dir: Path) -> Path:
        artifact = self._artifact(ref)
        label = f"{self.url}:{artifact.version}"
        try:
            return install_download(
                dest_dir, lambda root: artifact.download(root=str(root)), label,
                manifest_sha256=(artifact.metadata or {}).get("manifest_sha256"),
                size=getattr(artifact, "size", None))
        except StoreUnreachableError:
            raise
        except CheckpointError as e:
            raise CheckpointError(f"{e} W&B serves cached files by size only, so a damaged entry "
                                  "in the W&B cache (WANDB_CACHE_DIR) can cause this; delete the "
                                  "cache and retry.") from e

    def list_versions(self) -> list[VersionInfo]:
        path = f"{self.entity}/{self.project}/{self.name}"
        try:
            api = self._api()
            # Listing a missing artifact fails like a bad answer would; asking first tells a name
            # that does not exist (no versions) from a W&B that cannot be reached (raises).
            if not api.artifact_collection_exists(path, ARTIFACT_TYPE):
                return []
            versions = list(api.artifacts(ARTIFACT_TYPE, path))
        except CheckpointError:
            raise
        except Exception as e:
            raise StoreUnreachableError(f"Cannot list the versions of {self.url}: "
                                        f"{type(e).__name__}: {e}.") from e
        infos = [VersionInfo(a.version, (a.metadata or {}).get("step"), tuple(a.aliases),
                             a.size, str(a.created_at)) for a in versions]
        return sorted(infos, key=lambda v: version_number(v.version))
