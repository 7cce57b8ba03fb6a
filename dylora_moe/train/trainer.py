"""The training recipe: ``setup()``, ``train()``, ``evaluate()``, with its state in one place.

A plain PyTorch loop rather than HF ``Trainer``: exact resume needs the data position restored
directly (epoch, batch within the epoch) and the whole state listed explicitly, which is simpler
to own than to bend a framework into. Everything that a resume must restore is in
:class:`TrainerState` plus the model's trainable state, the optimizer, the scheduler and the RNGs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..errors import CheckpointError, ConfigError, DyLoRAError
from ..model import DyLoRAConfig, DyLoRAMoE
from ..model.base import load_base_model, load_tokenizer
from ..checkpoint.fingerprint import ArchitectureFingerprint, FingerprintMismatch
from ..checkpoint.format import (apply_retention, checkpoint_name, cleanup_partial, latest_checkpoint,
                                 list_checkpoints, read_manifest)
from ..checkpoint.resume import resolve_resume
from ..checkpoint.stores import BackgroundPublisher, LocalStore, open_store
from ..checkpoint.stores.probe import probe_store
from ..checkpoint.training import restore_training_checkpoint, save_training_checkpoint
from .config import TrainConfig
from .metrics import MetricsSink, make_sink
from .preemption import EXIT_PREEMPTED, Preempted, SignalWatch, StartupInterrupted, signal_name
from .report import plot_routing, write_summary
from .run_lock import RunDirLock

log = logging.getLogger(__name__)

EXIT_UNPUBLISHED = 3  # training finished, but some checkpoints never reached the store (local copies kept)
DISK_FULL_FREE_BYTES = 16 << 20  # below this much free space a failed write is reported as a full disk


class UnpublishedCheckpoints(DyLoRAError):
    """The run finished but the store did not confirm every checkpoint; exit status 3."""

    exit_code = EXIT_UNPUBLISHED


@dataclass
class TrainerState:
    """Progress of a run: what, besides tensors, a resume must restore."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed (this rank)
    tokens_seen: int = 0
    eval_loss_base: float | None = None
    best_eval_loss: float | None = None
    last_eval_loss: float | None = None
    last_eval_step: int | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    maturity_step: int | None = None
    train_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # rows logged since this process started
    history_base: int = 0  # rows before those, kept in RUN_DIR/history.jsonl (read only when needed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: TrainConfig, signals: SignalWatch | None = None):
        self.config = config
        self.state = TrainerState()
        self.stop_reason: str | None = None
        # The CLI's watch, installed before anything loads; without one (library use) signals are
        # watched from the start of the training loop.
        self.signals = signals
        self.phase = "starting"  # what start-up is doing, for the message if a signal stops it
        self.lock: RunDirLock | None = None
        self.publisher: BackgroundPublisher | None = None
        self.sink, self._sink_open = MetricsSink(), False
        self._unflushed = False  # the last history row has metrics the sink has not seen

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        cfg = self.config
        if cfg.fp16 and not torch.cuda.is_available():
            raise ConfigError("--fp16 needs a CUDA GPU and none is available; use --bf16 (works on CPU) or neither.")
        model_config = self.model_config()  # validates the mixture options before anything is loaded
        seed_everything(cfg.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.run_id = cfg.resolved_run_id()
        self.run_dir = Path(cfg.output_dir) / self.run_id
        self.checkpoint_dir = self.run_dir / "checkpoints"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunDirLock(self.run_dir).acquire()  # before anything in the run directory is touched
        except OSError as err:
            raise ConfigError(
                f"cannot write to --output_dir {cfg.output_dir!r} (run directory {self.run_dir}): "
                f"{err.strerror or err}. Give a writable directory with --output_dir.") from None
        try:
            for leftovers in (self.checkpoint_dir, self.run_dir / "downloads"):
                cleanup_partial(leftovers)  # staging folders of writes a crash interrupted
            if cfg.checkpoint_store == "wandb":  # the store is this run's artifact: open the run first
                self._open_sink()
            return self._setup_rest(model_config)
        except StartupInterrupted as stop:
            self._abort(EXIT_PREEMPTED)
            raise self._stopped_during_startup(stop) from None
        except BaseException:
            self._abort()
            raise

    def _setup_rest(self, model_config: DyLoRAConfig) -> "Trainer":
        from ..data import LengthGroupedBatchSampler, PaddingCollator, build_datasets

        cfg = self.config
        self.phase = "checking the checkpoint store"
        self.store = self._open_store()
        probe_store(self.store, cfg.store_timeout_s)
        self.phase = "fetching the checkpoint to resume from"
        reference, bare_is_wandb = cfg.resume_reference
        self.resume_dir = resolve_resume(
            reference, self.run_dir, self.store, bare_is_wandb=bare_is_wandb, allow_fresh_start=cfg.allow_fresh_start,
            start_from=cfg.start_from, timeout_s=cfg.store_timeout_s,
        )

        self.phase = "loading the base model"
        self.tokenizer = load_tokenizer(cfg.model_name)
        base = load_base_model(cfg.model_name).to(self.device)
        self.model = DyLoRAMoE(base, model_config)
        self.model.config.base_model_name_or_path = cfg.model_name
        self.model.to(self.device)
        if self.resume_dir is not None:
            self._check_fingerprint(reference)
        if not self._sink_open:
            self._open_sink()  # only now: a refused resume must not touch the W&B run

        self.phase = "loading the data"
        self.train_data, self.eval_data, self.data_report = build_datasets(
            cfg.datasets, self.tokenizer, cfg.max_seq_length, data_dir=cfg.data_dir, seed=cfg.seed,
            validation_fraction=cfg.validation_fraction, training_subset=cfg.training_subset,
            eval_subset=cfg.eval_subset, mixing=self._mixing(),
        )
        log.info("data:\n%s", self.data_report.summary())
        if len(self.eval_data) == 0:
            raise ConfigError("the validation split is empty: raise --validation_fraction or --eval_subset.")

        self.collator = PaddingCollator.for_tokenizer(self.tokenizer)
        self.sampler = LengthGroupedBatchSampler(self.train_data["length"], cfg.train_batch_size, seed=cfg.seed)
        self.eval_sampler = LengthGroupedBatchSampler(self.eval_data["length"], cfg.eval_batch_size, shuffle=False)
        steps_per_epoch = math.ceil(self.sampler.num_batches / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
        self.steps_per_epoch = steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            self.model.trainable_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.scheduler = self._make_scheduler()
        if self.resume_dir is not None:
            restore_training_checkpoint(self, self.resume_dir)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", self.resume_dir, self.state.global_step,
                     self.state.epoch, self.state.batch_in_epoch)
        self.publisher = BackgroundPublisher(self.store)
        self._republish_unconfirmed()
        return self

    def _republish_unconfirmed(self) -> None:
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
            log.warning("cannot list %s to find unpublished checkpoints (%s); they are kept locally", self.store.url, err)
            return
        for step, path in local:
            if step not in stored:
                log.warning("checkpoint %s was never confirmed by %s (an earlier process stopped first): "
                            "publishing it now", path, self.store.url)
                self.publisher.submit(path, step, ["latest"] + (["best"] if step == self.state.best_step else []))

    def _stopped_during_startup(self, stop: StartupInterrupted) -> Preempted:
        latest = latest_checkpoint(self.checkpoint_dir)
        saved = (f"the newest checkpoint {latest} is intact" if latest is not None
                 else f"run {self.run_id} has no local checkpoint yet")
        return stop.as_preempted(f"while {self.phase}: nothing new was saved and {saved}. Continue with the same "
                                 f"command and --resume auto --run_id {self.run_id}.")

    def _abort(self, exit_code: int = 1) -> None:
        """Leave after an error or an early signal: what is queued gets the preemption budget to publish."""
        if self.publisher is not None:
            self.publisher.close(timeout_s=self.config.preemption_budget_s)
        self.sink.finish(exit_code=exit_code)
        if self.lock is not None:
            self.lock.release()

    def _open_sink(self) -> None:
        cfg = self.config
        self.sink = make_sink(cfg.report_to, self.run_id, self.run_dir, cfg.wandb_project, cfg.wandb_entity, cfg.to_dict())
        self._sink_open = True

    def _open_store(self):
        """The store checkpoints are published to: ``wandb`` means this W&B run's artifact."""
        address = self.config.checkpoint_store
        if address == "wandb":
            run = getattr(self.sink, "run", None)
            if run is None:
                raise ConfigError("--checkpoint_store wandb needs W&B metrics: add --report_to wandb (and WANDB_API_KEY or WANDB_MODE).")
            from ..checkpoint.stores.wandb_store import WandbStore

            return WandbStore.for_run(run)
        if not address:
            return LocalStore.for_run_dir(self.run_dir)
        return open_store(address, timeout_s=self.config.store_timeout_s)

    def _check_fingerprint(self, reference: str | None) -> None:
        saved = ArchitectureFingerprint.from_dict(read_manifest(self.resume_dir).fingerprint)
        requested = ArchitectureFingerprint.of(self.model)
        diffs = saved.differences(requested, grow_experts=self.config.grow_experts)
        if diffs:
            hint = ""
            if any(d[0] == "num_experts" and d[2] > d[1] for d in diffs):
                hint = " A larger --num_experts is allowed with --grow_experts."
            if any(d[0] == "base_weights_sha" for d in diffs):
                hint += (f" The base model's weights differ from those the checkpoint was trained on "
                         f"({saved.base_model!r}): resume with the same base (a hub id and a local copy of the "
                         "same weights match).")
            source = str(reference) if reference not in (None, "auto") else str(self.resume_dir)
            raise FingerprintMismatch(source, diffs, hint)

    def _mixing(self) -> str:
        """Balanced or concatenated; weights written into --datasets ("a:2,b:1") win over both."""
        return "interleave" if self.config.interleaved_sampling else "concat"

    def model_config(self) -> DyLoRAConfig:
        cfg = self.config
        return DyLoRAConfig(
            num_experts=cfg.num_experts, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules, top_k=cfg.top_k, router_temperature=cfg.router_temperature,
            balance_coefficient=cfg.balance_coefficient, z_loss_coefficient=cfg.z_loss_coefficient,
        )

    def _make_scheduler(self):
        from transformers import get_cosine_schedule_with_warmup, get_cosine_with_hard_restarts_schedule_with_warmup

        warmup = int(self.config.warmup_ratio * self.total_steps)
        if self.config.cosine_restarts > 0:
            return get_cosine_with_hard_restarts_schedule_with_warmup(
                self.optimizer, warmup, self.total_steps, num_cycles=self.config.cosine_restarts + 1
            )
        return get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total_steps)

    def autocast(self):
        if self.config.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.config.fp16:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return nullcontext()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean LM loss over the validation set (response tokens only)."""
        was_training = self.model.training
        self.model.eval()
        loader = DataLoader(self.eval_data, batch_sampler=self.eval_sampler, collate_fn=self.collator,
                            generator=torch.Generator())  # own generator: never draw from the global RNG
        total, count = 0.0, 0
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast():
                logits = self.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
        self.model.train(was_training)
        return total / max(count, 1)

    # ------------------------------------------------------------------ training
    def _optimizer_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        n = len(micro_batches)
        sums = {"lm_loss": 0.0, "balance_loss": 0.0, "z_loss": 0.0, "entropy": 0.0, "max_prob": 0.0}
        usage = torch.zeros(self.model.num_experts)
        tokens = 0
        for batch in micro_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast():
                out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            (out.loss / n).backward()
            tokens += int(batch["attention_mask"].sum())
            sums["lm_loss"] += out.lm_loss.item() / n
            sums["balance_loss"] += out.balance_loss.item() / n
            sums["z_loss"] += out.z_loss.item() / n
            if out.router_stats is not None:
                sums["entropy"] += out.router_stats.entropy.item() / n
                sums["max_prob"] += out.router_stats.max_prob.item() / n
                usage += out.router_stats.expert_usage.detach().float().cpu() / n
        grad_norms = self._expert_grad_norms()
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {f"train/{k}": v for k, v in sums.items()}
        metrics.update({f"routing/usage_{e}": float(u) for e, u in enumerate(usage)})
        metrics.update({f"grad_norm/expert_{e}": float(g) for e, g in enumerate(grad_norms)})
        metrics["tokens"] = tokens
        return metrics

    def _expert_grad_norms(self) -> torch.Tensor:
        squares = torch.zeros(self.model.num_experts)
        for _, layer in self.model.adapted_layers():
            E, r = layer.num_experts, layer.r
            if layer.lora_A.grad is not None:
                squares += layer.lora_A.grad.float().unflatten(0, (E, r)).pow(2).sum((1, 2)).cpu()
            if layer.lora_B.grad is not None:
                squares += layer.lora_B.grad.float().unflatten(1, (E, r)).pow(2).sum((0, 2)).cpu()
        return squares.sqrt()

    def _maybe_mature(self) -> None:
        threshold = self.config.maturity_fraction * self.total_steps
        if self.state.maturity_step is None and self.state.global_step >= threshold and self.config.maturity_fraction < 1:
            self.model.set_maturity()
            self.state.maturity_step = self.state.global_step
            log.info("step %d: all experts mature, routing switches to top-%d", self.state.global_step, self.config.top_k)

    def _after_eval(self, loss: float) -> bool:
        """Record a validation loss; True when early stopping says stop."""
        st = self.state
        st.last_eval_loss, st.last_eval_step = loss, st.global_step
        if st.best_eval_loss is None or loss < st.best_eval_loss:
            st.best_eval_loss, st.best_step, st.evals_without_improvement = loss, st.global_step, 0
        else:
            st.evals_without_improvement += 1
        patience = self.config.early_stopping_patience
        return not self.config.disable_early_stopping and patience > 0 and st.evals_without_improvement >= patience

    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, st = self.config, self.state
        self.model.train()
        try:
            if st.eval_loss_base is None:
                self.phase = "evaluating the base model"
                st.eval_loss_base = self.evaluate()  # a fresh mixture is exactly the base model
                log.info("held-out loss of the base model: %.4f", st.eval_loss_base)
            if self.signals is None:
                self.signals = SignalWatch().install()
            self.signals.defer()  # from here a signal means: finish the step, checkpoint, exit 75
        except StartupInterrupted as stop:
            self._abort(EXIT_PREEMPTED)
            raise self._stopped_during_startup(stop) from None
        try:
            return self._train_loop()
        except (Preempted, UnpublishedCheckpoints):
            raise  # everything is already closed
        except BaseException:
            self._abort()
            raise

    def _train_loop(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, st = self.config, self.state
        self._maybe_mature()
        bar = tqdm(total=self.total_steps, initial=st.global_step, desc="train", unit="step",
                   disable=not cfg.progress, dynamic_ncols=True)
        window: list[dict[str, float]] = []
        window_start = time.perf_counter()
        started = time.perf_counter() - st.train_time_s
        while self.stop_reason is None:
            if st.global_step >= self.total_steps:
                self.stop_reason = "max steps reached"
                break
            self.sampler.set_epoch(st.epoch, start_batch=st.batch_in_epoch)
            # A DataLoader iterator draws a seed from its generator: a private one keeps the global
            # RNG (dropout) identical whether or not the run was resumed mid-epoch.
            batches = iter(DataLoader(self.train_data, batch_sampler=self.sampler, collate_fn=self.collator,
                                      generator=torch.Generator()))
            remaining = self.sampler.num_batches - st.batch_in_epoch
            while remaining > 0 and self.stop_reason is None:
                self._flush_log()  # the previous step's row is complete: one row per step
                n = min(cfg.gradient_accumulation_steps, remaining)
                metrics = self._optimizer_step([next(batches) for _ in range(n)])
                st.batch_in_epoch += n
                remaining -= n
                st.global_step += 1
                st.tokens_seen += metrics["tokens"]
                st.train_time_s = time.perf_counter() - started
                window.append(metrics)
                self._maybe_mature()
                if cfg.logging_steps and st.global_step % cfg.logging_steps == 0:
                    self._log_window(window, time.perf_counter() - window_start, bar)
                    window, window_start = [], time.perf_counter()
                if cfg.eval_steps and st.global_step % cfg.eval_steps == 0:
                    loss = self.evaluate()
                    self._log({"eval/loss": loss})
                    shown = getattr(bar, "postfix", None)  # a disabled bar (--progress false) has none
                    bar.set_postfix_str(f"{shown} val={loss:.3f}" if shown else f"val={loss:.3f}")
                    if self._after_eval(loss):
                        self.stop_reason = f"early stopping (no improvement in {cfg.early_stopping_patience} evaluations)"
                if cfg.save_steps and st.global_step % cfg.save_steps == 0:
                    self.save_checkpoint()
                bar.update(1)
                if self.signals.received is not None:
                    self._preempt(bar)
                if st.global_step >= self.total_steps and self.stop_reason is None:
                    self.stop_reason = "max steps reached"
            if remaining == 0:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        bar.close()
        if window:
            self._log_window(window, time.perf_counter() - window_start, None)
        st.train_time_s = time.perf_counter() - started
        return self.finish()

    def _preempt(self, bar) -> None:
        started = time.perf_counter()
        bar.close()
        directory = self.save_checkpoint(wait_s=self.config.preemption_budget_s)
        published = self.publisher.close(timeout_s=0)
        self._flush_log()
        self.sink.finish(exit_code=EXIT_PREEMPTED)
        self.lock.release()
        name = signal_name(self.signals.received)
        raise Preempted(
            f"stopped by {name} at step {self.state.global_step}: checkpoint {directory} written"
            f"{' and published' if published else ' (publishing did not finish in the budget)'} in "
            f"{time.perf_counter() - started:.1f} s. Continue with --resume auto --run_id {self.run_id}."
        )

    def _log(self, metrics: dict[str, float]) -> None:
        """Add metrics to this step's row; the sink gets one row per step (see ``_flush_log``)."""
        history, step = self.state.history, self.state.global_step
        if history and history[-1]["step"] == step:
            history[-1].update(metrics)
        else:
            history.append({"step": step, **metrics})
        self._unflushed = True

    def full_history(self) -> list[dict[str, Any]]:
        """Every logged row of the run, including those before a resume."""
        from ..checkpoint.training import read_history

        return read_history(self.run_dir, self.state.history_base) + self.state.history

    def _flush_log(self) -> None:
        if self._unflushed:
            row = dict(self.state.history[-1])
            self.sink.log({k: v for k, v in row.items() if k != "step"}, row["step"])
            self._unflushed = False

    def _log_window(self, window: list[dict[str, float]], seconds: float, bar) -> None:
        keys = [k for k in window[0] if k != "tokens"]
        mean = {k: sum(m[k] for m in window) / len(window) for k in keys}
        mean["train/tokens_per_s"] = sum(m["tokens"] for m in window) / max(seconds, 1e-9)
        mean["train/learning_rate"] = self.scheduler.get_last_lr()[0]
        mean["routing/dense"] = float(self.model.routing.dense)
        self._log(mean)
        if bar is not None:
            bar.set_postfix_str(f"loss={mean['train/lm_loss']:.3f} tok/s={mean['train/tokens_per_s']:.0f}")

    # ------------------------------------------------------------------ outputs
    def save_checkpoint(self, wait_s: float | None = None) -> Path:
        """Write a durable checkpoint and publish it (in the background unless ``wait_s`` is given)."""
        st = self.state
        with self._writing(f"checkpoint {checkpoint_name(st.global_step)}", self.checkpoint_dir):
            directory = save_training_checkpoint(self, self.checkpoint_dir)
        aliases = ["latest"] + (["best"] if st.best_step == st.global_step else [])
        self.publisher.submit(directory, st.global_step, aliases)
        if wait_s is not None and not self.publisher.flush(wait_s):
            log.warning("checkpoint %s is safe locally but not yet published to %s", directory, self.store.url)
        best = checkpoint_name(st.best_step) if st.best_step is not None else None
        unconfirmed = {p.name for p in self.publisher.unconfirmed()}
        apply_retention(self.checkpoint_dir, self.config.save_total_limit, best, keep=unconfirmed)
        return directory

    @contextlib.contextmanager
    def _writing(self, what: str, where: Path):
        """Turn a failed write (a full disk above all) into one paragraph that says what is still safe."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            free = _free_bytes(where)
            full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < DISK_FULL_FREE_BYTES
            if not full and not isinstance(err, OSError):
                raise
            latest = latest_checkpoint(self.checkpoint_dir)
            safe = (f"the previous checkpoint {latest} is intact" if latest is not None
                    else "no earlier checkpoint exists")
            cause = (f"the disk is full ({free / 1e6:.1f} MB free)" if full
                     else f"{err.strerror or err}")
            raise CheckpointError(
                f"cannot write {what} in {where}: {cause}. Nothing partial was kept and {safe}. "
                f"{'Free some space' if full else 'Fix the problem'} (or give --output_dir on another disk) and "
                f"continue with --resume auto --run_id {self.run_id}.") from None

    def finish(self) -> dict[str, Any]:
        from ..data import padding_waste

        st = self.state
        # The loop may have just evaluated this step, and then saved it: neither is done twice.
        evaluated = st.last_eval_step == st.global_step
        saved_after_eval = evaluated and (self.checkpoint_dir / checkpoint_name(st.global_step)).exists()
        if evaluated:
            final_loss = st.last_eval_loss
        else:
            final_loss = self.evaluate()
            self._log({"eval/loss": final_loss})
            self._after_eval(final_loss)
        self._flush_log()
        if not saved_after_eval:
            self.save_checkpoint()
        # A signal now (the loop is over) only shortens the wait for the store to the preemption budget.
        wait_s = self.config.preemption_budget_s if self.signals.received is not None else self.config.publish_timeout_s
        self.publisher.close(timeout_s=wait_s)
        unpublished = sorted(self.publisher.unconfirmed())
        model_dir = self.run_dir / "final"
        with self._writing("the final model", model_dir):
            self.model.save_pretrained(model_dir)
            self.tokenizer.save_pretrained(model_dir)
        best_dir = self.checkpoint_dir / checkpoint_name(st.best_step) if st.best_step is not None else None
        if hasattr(self.store, "publish_final_best") and best_dir is not None and best_dir.exists():
            self.store.publish_final_best(best_dir, st.best_step)  # the seed's best-dylora-model-full
        png = plot_routing(self.full_history(), self.model.num_experts, self.run_dir / "routing.png", st.maturity_step)
        lengths = self.train_data["length"]
        summary = {
            "run_id": self.run_id,
            "steps": st.global_step,
            "epochs": st.global_step / max(self.steps_per_epoch, 1),
            "stop_reason": self.stop_reason,
            "eval_loss_base": st.eval_loss_base,
            "eval_loss_final": final_loss,
            "eval_loss_best": st.best_eval_loss,
            "best_step": st.best_step,
            "train_time_s": st.train_time_s,
            "tokens_seen": st.tokens_seen,
            "tokens_per_s": st.tokens_seen / max(st.train_time_s, 1e-9),
            "padding_waste": padding_waste(lengths, self.sampler.rank_batches(0)),
            "maturity_step": st.maturity_step,
            "num_experts": self.model.num_experts,
            "train_examples": len(self.train_data),
            "eval_examples": len(self.eval_data),
            "model_dir": str(model_dir),
            "routing_png": str(png) if png else None,
            "unpublished_checkpoints": [str(p) for p in unpublished],
            "data": self.data_report.to_dict(),
        }
        text = write_summary(self.run_dir, summary)
        log.info("summary:\n%s", text)
        self.sink.finish()
        self.lock.release()
        if unpublished:
            last_error = next((job.error for job in reversed(self.publisher.failed) if job.error), "no answer in time")
            raise UnpublishedCheckpoints(
                f"training finished (model in {model_dir}) but {len(unpublished)} checkpoint(s) were not published to "
                f"{self.store.url} ({last_error}): {', '.join(p.name for p in unpublished)}. Their local copies are "
                f"kept in {self.checkpoint_dir}. Run the same command with --resume auto --run_id {self.run_id} to "
                "publish them.")
        return summary


def _free_bytes(path: Path) -> int:
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 0
