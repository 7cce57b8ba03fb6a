"""The run's checkpoints, in one object the trainer calls: :class:`Checkpointer`.

It owns the run directory's lock, the store (opened and probed at start-up), the resume
(:meth:`Checkpointer.resume`: resolve the reference, fetch and verify it, adopt the settings it
implies, compare fingerprints, read it: one value, :class:`Resumed`, for the trainer to restore),
the save (a durable local write, with a full disk reported as one paragraph), publishing in the
background, retention, re-publishing the checkpoints an earlier process never got confirmed, and
at the end of the run the final model, flush and close. What a
checkpoint holds is ``checkpoint_payload.py``; the formats and stores are ``dylora_moe.checkpoint``,
which knows nothing of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from ..checkpoint.commit import cleanup_partial
from ..checkpoint.directory import apply_retention, latest_checkpoint, list_checkpoints
from ..checkpoint.fingerprint import ArchitectureFingerprint, FingerprintMismatch
from ..checkpoint.format import checkpoint_name, read_manifest
from ..checkpoint.resume import resolve_resume
from ..checkpoint.stores import BackgroundPublisher, CheckpointStore, open_store
from ..checkpoint.stores.download import free_bytes
from ..checkpoint.stores.probe import probe_store
from ..errors import CheckpointError, ConfigError, UnpublishedCheckpoints
from ..model import DyLoRAConfig, DyLoRAMoE
from .checkpoint_payload import (
    GatheredState,
    RunRecord,
    TrainingPayload,
    read_training_checkpoint,
    restore_weights,
    save_training_checkpoint,
)
from .config import TrainConfig
from .history import MetricHistory
from .run_lock import RunDirLock
from .state import TrainerState

if TYPE_CHECKING:
    from .distributed import Ranks

log = logging.getLogger(__name__)

DISK_FULL_FREE_BYTES = 16 << 20  # below this much free space a failed write is reported as a full disk


@dataclass
class Resumed:
    """A checkpoint this run continues from, the same on every rank: what the trainer restores.

    Its weights are already in the model :meth:`Checkpointer.resume` returned with it (before the
    model is distributed); the rest of ``payload`` (optimizer, schedule, RNGs, progress) is the
    trainer's to put back once its optimizer exists."""

    directory: Path  # rank 0's verified local copy
    payload: TrainingPayload
    grown: bool  # the model has more experts than the checkpoint (--grow_experts): the new ones start fresh


class Checkpointer:
    """Checkpoints of run ``run_id`` in ``RUN_DIR/checkpoints``, published to the run's store.

    Every rank has one; rank 0 alone writes, publishes and reads the store (the trainer calls those
    parts through ``Ranks.on_main``; :meth:`resume` does so itself).
    ``store``: a store object to use instead of the one ``--checkpoint_store`` names (library use).
    """

    def __init__(self, config: TrainConfig, run_id: str, run_dir: Path, store: CheckpointStore | None = None):
        self.config, self.run_id, self.run_dir = config, run_id, run_dir
        self.checkpoint_dir = run_dir / "checkpoints"
        self.store: CheckpointStore | None = store
        self.publisher: BackgroundPublisher | None = None
        self.resume_dir: Path | None = None
        self.lock: RunDirLock | None = None  # rank 0's, from claim() to release()

    # ------------------------------------------------------------------ start-up
    def claim(self) -> None:
        """Rank 0: lock the run directory (a second process on it is refused) before anything in it is
        touched, then remove the staging folders of writes a crash interrupted."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunDirLock(self.run_dir).acquire()
        except OSError as err:
            raise ConfigError(
                f"cannot write to --output_dir {self.config.output_dir!r} (run directory {self.run_dir}): "
                f"{err.strerror or err}. Give a writable directory with --output_dir.") from None
        for leftovers in (self.checkpoint_dir, self.run_dir / "downloads"):
            cleanup_partial(leftovers)

    def open_store(self, wandb_run: Any = None) -> CheckpointStore:
        """Open the store (``wandb``: the artifact of ``wandb_run``) and check, in bounded time, that it works."""
        if self.store is None:
            address = self.config.checkpoint_store
            if address == "wandb" and wandb_run is None:
                raise ConfigError("--checkpoint_store wandb needs W&B metrics: add --report_to wandb (and "
                                  "WANDB_API_KEY or WANDB_MODE).")
            self.store = open_store(address, run=wandb_run, run_dir=self.run_dir, timeout_s=self.config.store_timeout_s)
        probe_store(self.store, self.config.store_timeout_s)
        return self.store

    def resume(self, ranks: "Ranks", model_config: DyLoRAConfig,
               build: Callable[[DyLoRAConfig], DyLoRAMoE]) -> tuple[DyLoRAMoE, Resumed | None]:
        """The model, built by ``build`` on every rank, and what to restore into it (None: a fresh start).

        Every rank calls it. Rank 0 resolves ``--resume`` (``auto``, ``--start_from``) to a verified
        local checkpoint. Its settings shape the model: an unset ``--lora_alpha`` is the checkpoint's
        (derived from its experts and rank, so ``--grow_experts`` keeps the scale the experts were
        trained with), unset ``--target_modules`` are its layers (a run started before the default
        changed resumes as it was trained). Rank 0 then compares the checkpoint's fingerprint with the
        built model's (a mismatch raises here, before anything is trained or W&B is opened) and reads
        it; every rank gets it and loads its weights into the model, which is not distributed yet.
        """
        saved = ranks.on_main(self._fetch, "fetching the checkpoint to resume from")
        if saved is not None:
            if not self.config.lora_alpha:
                model_config = dataclasses.replace(model_config, alpha=saved.alpha)
            if self.config.target_modules is None:
                model_config = dataclasses.replace(model_config, target_modules=tuple(saved.target_modules))
        model = build(model_config)
        if saved is None:
            return model, None
        directory, payload = ranks.on_main(lambda: self._check_and_read(model),
                                           "checking the checkpoint to resume from")
        return model, Resumed(directory, payload, grown=restore_weights(payload, model))

    def _fetch(self) -> ArchitectureFingerprint | None:
        """Rank 0: the fingerprint of the checkpoint to resume from, fetched and verified; None: none."""
        cfg = self.config
        reference, bare_is_wandb = cfg.resume_reference
        if reference is None:
            self._refuse_to_start_over()
        self.resume_dir = resolve_resume(
            reference, self.run_dir, self.store, bare_is_wandb=bare_is_wandb, allow_fresh_start=cfg.allow_fresh_start,
            start_from=cfg.start_from, timeout_s=cfg.store_timeout_s,
        )
        if self.resume_dir is None:
            return None
        return ArchitectureFingerprint.from_dict(read_manifest(self.resume_dir).fingerprint)

    def _refuse_to_start_over(self) -> None:
        """A fresh start under a run id that already has checkpoints would mix two runs' lineages (steps
        from both beside each other, ``latest`` in the store still the old run's): refused, nothing changed."""
        latest = self.latest()
        if latest is None:
            return
        step = read_manifest(latest).global_step
        raise ConfigError(
            f"run {self.run_id} already has checkpoints up to step {step} ({self.checkpoint_dir}): add --resume auto "
            f"to continue it, or choose another --run_id. To start over under this id, delete {self.run_dir} (and "
            "its store) first. Nothing was changed.")

    def _check_and_read(self, model: DyLoRAMoE) -> tuple[Path, TrainingPayload]:
        """Rank 0: refuse the fetched checkpoint if it does not fit ``model``, else read it into memory."""
        self.check_fingerprint(model)
        return self.resume_dir, read_training_checkpoint(self.resume_dir)

    def check_fingerprint(self, model: DyLoRAMoE) -> None:
        """Refuse a checkpoint whose architecture or base weights differ from ``model``'s."""
        saved = ArchitectureFingerprint.from_dict(read_manifest(self.resume_dir).fingerprint)
        requested = ArchitectureFingerprint.of(model)
        diffs = saved.differences(requested, grow_experts=self.config.grow_experts)
        if diffs:
            hint = ""
            if any(d[0] == "num_experts" and d[2] > d[1] for d in diffs):
                hint = " A larger --num_experts is allowed with --grow_experts."
            if any(d[0] == "base_weights_sha" for d in diffs):
                hint += (f" The base model's weights differ from those the checkpoint was trained on "
                         f"({saved.base_model!r}): resume with the same base (a hub id and a local copy of the "
                         "same weights match).")
            reference = self.config.resume_reference[0]
            source = str(reference) if reference not in (None, "auto") else str(self.resume_dir)
            raise FingerprintMismatch(source, diffs, hint)

    def start_publishing(self, best_step: int | None) -> None:
        """Start the background publisher; first in its queue, what an earlier process left unconfirmed."""
        self.publisher = BackgroundPublisher(self.store)
        self._republish_unconfirmed(best_step)

    def _republish_unconfirmed(self, best_step: int | None) -> None:
        """Publish, in order, the local checkpoints of an earlier process that the store never confirmed.

        A crash or kill during (or before) a publish leaves a checkpoint that exists only here. It is
        queued again before any new checkpoint, so it is kept by retention until the store confirms it.
        """
        local = list_checkpoints(self.checkpoint_dir)
        if not local:
            return
        try:
            stored = {v.step for v in self.store.list_versions()}
        except CheckpointError as err:
            log.warning("cannot list %s to find unpublished checkpoints (%s); they are kept locally",
                        self.store.url, err)
            return
        for step, path in local:
            if step not in stored:
                log.warning("checkpoint %s was never confirmed by %s (an earlier process stopped first): "
                            "publishing it now", path, self.store.url)
                self.publisher.submit(path, step, ["latest"] + (["best"] if step == best_step else []))

    # ------------------------------------------------------------------ during the run
    def save(self, model: DyLoRAMoE, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainerState,
             history: MetricHistory, run: RunRecord, wait_s: float | None = None,
             gathered: GatheredState | None = None) -> Path:
        """Write a durable checkpoint and publish it (in the background unless ``wait_s`` is given).

        ``gathered``: what the other ranks contributed (their RNG states; under FSDP the whole state)."""
        with self.writing(f"checkpoint {checkpoint_name(state.global_step)}", self.checkpoint_dir):
            rows = history.write(state)
            directory = save_training_checkpoint(self.checkpoint_dir, model, optimizer, scheduler, state, rows, run,
                                                 gathered)
        aliases = ["latest"] + (["best"] if state.best_step == state.global_step else [])
        self.publisher.submit(directory, state.global_step, aliases)
        if wait_s is not None and not self.flush(wait_s):
            log.warning("checkpoint %s is safe locally but not yet published to %s", directory, self.store.url)
        best = checkpoint_name(state.best_step) if state.best_step is not None else None
        unconfirmed = {p.name for p in self.publisher.unconfirmed()}
        apply_retention(self.checkpoint_dir, self.config.save_total_limit, best, keep=unconfirmed)
        return directory

    def local_path(self, step: int) -> Path:
        """Where this run's checkpoint of ``step`` is (or would be) written."""
        return self.checkpoint_dir / checkpoint_name(step)

    def has_local(self, step: int) -> bool:
        return (self.checkpoint_dir / checkpoint_name(step)).exists()

    def latest(self) -> Path | None:
        """The newest complete local checkpoint."""
        return latest_checkpoint(self.checkpoint_dir)

    @contextlib.contextmanager
    def writing(self, what: str, where: Path) -> Iterator[None]:
        """Turn a failed write (a full disk above all) into one paragraph that says what is still safe."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            free = free_bytes(where)
            full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < DISK_FULL_FREE_BYTES
            if not full and not isinstance(err, OSError):
                raise
            latest = self.latest()
            safe = (f"the previous checkpoint {latest} is intact" if latest is not None
                    else "no earlier checkpoint exists")
            cause = (f"the disk is full ({free / 1e6:.1f} MB free)" if full
                     else f"{err.strerror or err}")
            raise CheckpointError(
                f"cannot write {what} in {where}: {cause}. Nothing partial was kept and {safe}. "
                f"{'Free some space' if full else 'Fix the problem'} (or give --output_dir on another disk) and "
                f"continue with --resume auto --run_id {self.run_id}.") from None

    def flush(self, timeout_s: float | None) -> bool:
        """Wait up to ``timeout_s`` for every queued checkpoint to reach the store; whether all did."""
        return self.publisher.flush(timeout_s)

    # ------------------------------------------------------------------ end of the run
    def finish(self, model: DyLoRAMoE, tokenizer: Any, weights: dict[str, torch.Tensor], best_step: int | None,
               timeout_s: float | None) -> tuple[Path, list[Path]]:
        """Rank 0: give what is queued ``timeout_s`` to reach the store, write the final model (``weights``
        and the tokenizer) into ``RUN_DIR/final``, publish the best checkpoint as the final artifact
        where the store has one. The final model's directory, and the checkpoints never confirmed."""
        self.close(timeout_s=timeout_s)
        unpublished = self.unpublished()
        model_dir = self.run_dir / "final"
        with self.writing("the final model", model_dir):
            model.save_pretrained(model_dir, state=weights)
            tokenizer.save_pretrained(model_dir)
        self.publish_final_best(best_step)  # the seed's best-dylora-model-full
        return model_dir, unpublished

    def close(self, timeout_s: float | None) -> bool:
        """Give what is queued ``timeout_s`` to reach the store; whether everything did."""
        if self.publisher is None:
            return True
        return self.publisher.close(timeout_s=timeout_s)

    def release(self) -> None:
        """Unlock the run directory (the last thing a run does)."""
        if self.lock is not None:
            self.lock.release()

    def unpublished(self) -> list[Path]:
        """Local checkpoints the store has not confirmed (after ``close``: never will, in this process)."""
        return sorted(self.publisher.unconfirmed()) if self.publisher is not None else []

    def unpublished_error(self, model_dir: Path, unpublished: list[Path]) -> UnpublishedCheckpoints:
        last_error = next((job.error for job in reversed(self.publisher.failed) if job.error), "no answer in time")
        return UnpublishedCheckpoints(
            f"training finished (model in {model_dir}) but {len(unpublished)} checkpoint(s) were not published to "
            f"{self.store.url} ({last_error}): {', '.join(p.name for p in unpublished)}. Their local copies are "
            f"kept in {self.checkpoint_dir}. Run the same command with --resume auto --run_id {self.run_id} to "
            "publish them.")

    def publish_final_best(self, best_step: int | None) -> None:
        """The seed's ``best-dylora-model-full`` artifact, for stores that have one (W&B)."""
        best_dir = self.checkpoint_dir / checkpoint_name(best_step) if best_step is not None else None
        if hasattr(self.store, "publish_final_best") and best_dir is not None and best_dir.exists():
            self.store.publish_final_best(best_dir, best_step)
