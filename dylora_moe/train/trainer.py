"""The training recipe: ``setup()``, ``train()``, ``train_step()``, ``evaluate()``, ``finish()``.

A plain PyTorch loop: exact resume needs the data position restored directly and the whole state
listed explicitly, simpler to own than to bend a framework into. ``setup()`` is a walk of steps that
each return what they build; a resume is one value (``Checkpointer.resume``) restored in one place
(``_restore``). The loop body reads in order: ``train_step``, then ``_after_step``. The rest it calls:
the Checkpointer, the BatchPlan (the global batch over any number of ranks, counted in global
micro-batches), Ranks (everything distributed), the loop's helpers (``callbacks.py``), the metric
history and the reports.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from ..checkpoint.stores import CheckpointStore
from ..errors import EXIT_PREEMPTED, ConfigError, Preempted, UnpublishedCheckpoints
from ..model import DyLoRAConfig, DyLoRAMoE
from ..model.base import load_base_model, load_tokenizer
from ..runtime.signals import SignalWatch, StartupInterrupted, signal_name
from .batch_plan import BatchPlan
from .callbacks import EarlyStopping, MaturitySchedule, MetricWindow, StepMetrics, validation_loss
from .checkpoint_payload import GatheredState, RunRecord, fingerprint_of, restore_progress, rng_state, trainable_weights
from .checkpointing import Checkpointer, Resumed
from .config import TrainConfig
from .distributed import Ranks
from .example_trace import ExampleTrace
from .history import MetricHistory
from .report import end_of_run_reports, run_summary, write_summary
from .state import TrainerState

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainerState"]


class Trainer:
    """``store``: a store object to publish to instead of the one ``--checkpoint_store`` names."""

    def __init__(self, config: TrainConfig, signals: SignalWatch | None = None, store: CheckpointStore | None = None):
        self.config = config
        self.state = TrainerState()
        self.stop_reason: str | None = None
        self._saved_step: int | None = None  # the step of the last checkpoint this process wrote
        self.signals = signals  # the CLI's, installed before anything loads; else (library use) from train()
        self.phase = "starting"  # what start-up is doing, for the message if a signal stops it
        self.checkpointer: Checkpointer | None = None
        self._store = store
        self.history: MetricHistory | None = None  # with the sink (W&B), rank 0's
        self.early_stopping = EarlyStopping.for_config(config)
        self.maturity = MaturitySchedule.for_config(config)
        self.ranks = Ranks()

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        """Build the run on this rank, each step returning what it builds: the model (holding a checkpoint's
        weights when resuming), the data and its batches, the distributed model, the optimizer, the rest."""
        cfg = self.config
        if cfg.fp16 and not torch.cuda.is_available():
            raise ConfigError("--fp16 needs a CUDA GPU and none is available; use --bf16 (works on CPU) or neither.")
        model_config = self.config.model_config()  # validates the mixture options before anything is loaded
        self.ranks = ranks = Ranks.from_environment()  # under a launcher: join the other ranks first
        ranks.seed(cfg.seed)
        self.device = ranks.device()
        self.run_id = cfg.resolved_run_id()
        self.run_dir = Path(cfg.output_dir) / self.run_id
        self.history = MetricHistory(self.run_dir)
        self.checkpointer = Checkpointer(cfg, self.run_id, self.run_dir, store=self._store)
        with self._closing_if_stopped():
            ranks.on_main(self._start_on_main, "claiming the run directory")
            self.phase = "fetching the checkpoint to resume from"
            self.model, resumed = self.checkpointer.resume(ranks, model_config, build=self._setup_model)
            # only now: a refused resume never touches W&B
            ranks.on_main(functools.partial(self.history.open_sink, cfg, self.run_id), "opening the metrics run")
            self.plan = BatchPlan.for_run(ranks.world_size, cfg.gradient_accumulation_steps, cfg.train_batch_size,
                                          resumed.payload if resumed is not None else None, rank=ranks.rank)
            self.tokenizer, self.train_data, self.eval_data, self.data_report, self.collator = self._setup_data()
            self.sampler, self.eval_sampler = self.plan.samplers(self.train_data["length"], self.eval_data["length"],
                                                                 cfg.eval_batch_size, cfg.seed)
            self.steps_per_epoch, self.total_steps = self.plan.steps(self.sampler.global_num_batches, cfg.max_steps,
                                                                     cfg.num_epochs)
            ranks.diverge(cfg.seed)  # the same initial weights everywhere, but each rank its own dropout
            self.fingerprint = fingerprint_of(self.model)  # of the whole base, which checkpoints record
            self.train_model = ranks.prepare(self.model, fsdp=cfg.fsdp)
            self.optimizer, self.scheduler = self._setup_optimizer()
            self.state = self._restore(resumed)
            ranks.on_main(functools.partial(self.checkpointer.start_publishing, self.state.best_step),
                          "starting the publisher")
            return self

    @contextlib.contextmanager
    def _closing_if_stopped(self) -> Iterator[None]:
        """Around start-up and training: an error or a signal closes what is open (the publisher gets the
        preemption budget for what is queued); a signal during start-up exits 75, saying what is saved."""
        try:
            yield
        except (Preempted, UnpublishedCheckpoints):
            raise  # everything is already closed
        except StartupInterrupted as stop:
            self._abort(EXIT_PREEMPTED)
            latest = self.checkpointer.latest() if self.checkpointer is not None and self.ranks.is_main else None
            saved = (f"the newest checkpoint {latest} is intact" if latest is not None else
                     f"run {self.run_id} has no local checkpoint yet" if self.ranks.is_main else
                     "the run's checkpoints are rank 0's")
            raise stop.as_preempted(f"while {self.phase}: nothing new was saved and {saved}. Continue with the same "
                                    f"command and --resume auto --run_id {self.run_id}.") from None
        except BaseException:
            self._abort()
            raise

    def _start_on_main(self) -> None:
        """Rank 0: claim the run directory, open W&B when it is the store, open and probe the store."""
        self.checkpointer.claim()
        if self.config.checkpoint_store == "wandb":  # the store is this run's artifact: open the run first
            self.history.open_sink(self.config, self.run_id)
        self.phase = "checking the checkpoint store"
        self.checkpointer.open_store(wandb_run=getattr(self.history.sink, "run", None))

    def _setup_model(self, model_config: DyLoRAConfig) -> DyLoRAMoE:
        """The mixture of ``model_config`` on the base model, on this rank's device."""
        self.phase = "loading the base model"
        model = DyLoRAMoE(load_base_model(self.config.model_name).to(self.device), model_config)
        model.config.base_model_name_or_path = self.config.model_name
        return model.to(self.device)

    def _setup_data(self) -> tuple[Any, Any, Any, Any, Any]:
        """The tokenizer, the training and validation splits, the report of what was loaded, the collator."""
        from ..data import PaddingCollator, build_datasets

        cfg = self.config
        self.phase = "loading the data"
        tokenizer = load_tokenizer(cfg.model_name)
        train_data, eval_data, report = build_datasets(
            cfg.datasets, tokenizer, cfg.max_seq_length, data_dir=cfg.data_dir, seed=cfg.seed,
            validation_fraction=cfg.validation_fraction, training_subset=cfg.training_subset,
            eval_subset=cfg.eval_subset, mixing="interleave" if cfg.interleaved_sampling else "concat",
        )  # weights written into --datasets ("a:2,b:1") win over either mixing
        log.info("data:\n%s", report.summary())
        if len(eval_data) == 0:
            raise ConfigError("the validation split is empty: raise --validation_fraction or --eval_subset.")
        # the dataset-MI router loss needs each example's dataset as a number (same order on every rank)
        sources = (sorted(set(train_data["source"]) | set(eval_data["source"]))
                   if self.model.config.dataset_mi_coefficient else None)
        return tokenizer, train_data, eval_data, report, PaddingCollator.for_tokenizer(tokenizer, sources=sources)

    def _setup_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW over the trainable parameters (the distributed ones), and its learning-rate schedule."""
        cfg = self.config
        optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay)
        return optimizer, self._make_scheduler(optimizer)

    def _restore(self, resumed: Resumed | None) -> TrainerState:
        """The progress to continue from: a fresh one, or the checkpoint's, with its optimizer state (not
        after growth), the schedule's position and this rank's RNGs put back (its weights already are)."""
        if resumed is None:
            return TrainerState()
        load = functools.partial(self.ranks.load_optimizer_state, self.model, self.optimizer)
        state = restore_progress(resumed.payload, self.optimizer, self.scheduler, self.ranks.rank, resumed.grown, load)
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d of %d)%s", resumed.directory, state.global_step,
                 state.epoch, state.batch_in_epoch, self.sampler.global_num_batches,
                 self.plan.change(self.config.gradient_accumulation_steps))
        return state

    @property
    def resume_dir(self) -> Path | None:
        """The verified local checkpoint this run resumed from (rank 0; None: a fresh start)."""
        return self.checkpointer.resume_dir if self.checkpointer is not None else None

    def close(self) -> None:
        """Release what ``setup()`` took without running ``train()`` (library use, benchmarks): what is
        queued gets the preemption budget to publish; the metrics run, run lock and process group close."""
        self._abort(exit_code=0)

    def _abort(self, exit_code: int = 1) -> None:
        if self.checkpointer is not None:  # and the history with it
            self.checkpointer.close(timeout_s=self.config.preemption_budget_s)
            self.history.sink.finish(exit_code=exit_code)
            self.checkpointer.release()
        self._leave_ranks()

    def _leave_ranks(self) -> None:
        self.train_model = getattr(self, "model", None)  # the DDP wrapper goes before the process group
        self.ranks.close()

    def _make_scheduler(self, optimizer: torch.optim.Optimizer | None = None):
        """Cosine decay over ``total_steps`` after ``--warmup_ratio`` of them (with ``--cosine_restarts``)."""
        from transformers import get_cosine_schedule_with_warmup, get_cosine_with_hard_restarts_schedule_with_warmup

        optimizer, warmup = optimizer or self.optimizer, int(self.config.warmup_ratio * self.total_steps)
        if self.config.cosine_restarts > 0:
            return get_cosine_with_hard_restarts_schedule_with_warmup(
                optimizer, warmup, self.total_steps, num_cycles=self.config.cosine_restarts + 1)
        return get_cosine_schedule_with_warmup(optimizer, warmup, self.total_steps)

    def autocast(self):
        dtype = torch.bfloat16 if self.config.bf16 else torch.float16 if self.config.fp16 else None
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float:
        """Token-weighted mean LM loss over the validation set (:func:`validation_loss`), the same on every rank."""
        loader = DataLoader(self.eval_data, batch_sampler=self.eval_sampler, collate_fn=self.collator,
                            generator=torch.Generator())  # own generator: never draw from the global RNG
        return validation_loss(self.model, loader, self.ranks, self.device, self.autocast,
                               real_batches=self.eval_sampler.unpadded_num_batches)

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (gradient accumulation): forward, backward, clip, update;
        its metrics (:class:`StepMetrics`). The run's progress (``state``) is the loop's to advance."""
        n, metrics = len(micro_batches), StepMetrics(self.model.num_experts, len(micro_batches))
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            # with several ranks, gradients are averaged once per step: in the last micro-batch's backward
            with self.ranks.gradient_sync(self.train_model, enabled=i == n - 1), self.autocast():
                out = self.train_model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                       labels=batch["labels"], dataset_ids=batch.get("dataset_ids"))
                (out.loss / n).backward()
            metrics.add(out, batch["attention_mask"])
        grad_norms = self.model.expert_grad_norms()  # before clipping
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics.result(self.ranks, grad_norms)

    def train(self) -> dict[str, Any]:
        """Train to the end of the run (``--max_steps``, epochs, early stopping or a signal): the summary."""
        st = self.state
        self.model.train()
        with self._closing_if_stopped():
            if st.eval_loss_base is None:
                self.phase = "evaluating the base model"
                st.eval_loss_base = self.evaluate()  # a fresh mixture is exactly the base model
                log.info("held-out loss of the base model: %.4f", st.eval_loss_base)
            if self.signals is None:
                self.signals = SignalWatch().install()
            self.signals.defer()  # from here a signal means: finish the step, checkpoint, exit 75
            return self._train_loop()

    def _train_loop(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, st = self.config, self.state
        self.maturity.update(self.model, st, self.total_steps)
        bar = tqdm(total=self.total_steps, initial=st.global_step, desc="train", unit="step",
                   disable=not (cfg.progress and self.ranks.is_main), dynamic_ncols=True)
        world = self.ranks.world_size
        trace = ExampleTrace.from_environment(self.ranks.rank, world)  # DYLORA_TRACE_EXAMPLES: a debugging record
        window = MetricWindow()
        started = time.perf_counter() - st.train_time_s
        while self.stop_reason is None:
            if st.global_step >= self.total_steps:
                self.stop_reason = "max steps reached"
                break
            # st.batch_in_epoch counts the epoch's micro-batches over every rank; this rank holds every
            # world-th of them (see LengthGroupedBatchSampler)
            start = st.batch_in_epoch // world
            self.sampler.set_epoch(st.epoch, start_batch=start)
            # A DataLoader iterator draws a seed from its generator: a private one keeps the global
            # RNG (dropout) identical whether or not the run was resumed mid-epoch.
            batches = iter(DataLoader(self.train_data, batch_sampler=self.sampler, collate_fn=self.collator,
                                      generator=torch.Generator()))
            remaining = self.sampler.num_batches - start
            if trace:
                trace.start_epoch(self.sampler.rank_batches(st.epoch)[start:])
            while remaining > 0 and self.stop_reason is None:
                self.history.flush(st)  # the previous step's row is complete: one row per step
                n = min(self.plan.accumulation, remaining)
                if trace:
                    trace.record(st.global_step + 1, n)
                metrics = self.train_step([next(batches) for _ in range(n)])
                st.batch_in_epoch += n * world
                remaining -= n
                st.global_step += 1
                st.tokens_seen += metrics["tokens"]
                st.train_time_s = time.perf_counter() - started
                window.add(metrics)
                self._after_step(window, bar)
            if remaining == 0:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        bar.close()
        if window:
            self._log_window(window, None)
        st.train_time_s = time.perf_counter() - started
        return self.finish()

    def _after_step(self, window: MetricWindow, bar) -> None:
        """What follows every optimizer step, in this order: maturity, metrics, the evaluation point,
        the checkpoint, a pending signal, the step limit."""
        cfg, st = self.config, self.state
        self.maturity.update(self.model, st, self.total_steps)
        if cfg.logging_steps and st.global_step % cfg.logging_steps == 0:
            self._log_window(window, bar)
        # the last step is an evaluation point too, before its checkpoint: finish() then neither evaluates
        # nor writes (and publishes) that step a second time
        if (cfg.eval_steps and st.global_step % cfg.eval_steps == 0) or st.global_step >= self.total_steps:
            self._evaluation_point(bar)
        pass_at_1_every = cfg.eval_every or cfg.eval_steps
        if cfg.eval_benchmarks and pass_at_1_every and st.global_step % pass_at_1_every == 0 and self.ranks.is_main:
            from ..eval.during_training import evaluate_during_training  # pass@1, run in the sandbox

            # logged by rank 0 alone (the others wait in the next step); the global RNG is left as it was
            self.history.log(st, evaluate_during_training(self.model, self.tokenizer, cfg.eval_benchmark_list,
                                                          cfg.eval_max_tasks, data_dir=cfg.data_dir))
        if cfg.save_steps and st.global_step % cfg.save_steps == 0:
            self.save_checkpoint()
        bar.update(1)
        signum, rank = self.ranks.first_signal(self.signals.received)  # every rank stops at the same step
        if signum is not None:
            self._preempt(bar, signum, rank)
        if st.global_step >= self.total_steps and self.stop_reason is None:
            self.stop_reason = "max steps reached"

    def _evaluation_point(self, bar) -> None:
        """Every ``--eval_steps`` optimizer steps: the validation loss, and early stopping on it. Other
        evaluations belong here too (before this step's checkpoint, which records them), drawing nothing
        from the global RNG."""
        loss = self.evaluate()
        self.history.log(self.state, {"eval/loss": loss})
        shown = re.sub(r",?\s*val=\S+", "", getattr(bar, "postfix", None) or "")  # a disabled bar has none
        bar.set_postfix_str(f"{shown} val={loss:.3f}".strip())
        if self.early_stopping.record(self.state, loss):
            self.stop_reason = self.early_stopping.reason()

    def _preempt(self, bar, signum: int, rank: int) -> None:
        started = time.perf_counter()
        bar.close()
        budget = self.config.preemption_budget_s
        if self._saved_step == self.state.global_step:  # this step's checkpoint was just written: not again
            directory = self.checkpointer.local_path(self.state.global_step)
            self.ranks.on_main(lambda: self.checkpointer.flush(budget), "publishing the checkpoint of this step")
        else:
            directory = self.save_checkpoint(wait_s=budget)
        published = self.ranks.on_main(self._close_after_preemption, "publishing the preemption checkpoint")
        self._leave_ranks()
        name = signal_name(signum)
        by = f" (received by rank {rank} of {self.ranks.world_size})" if self.ranks.enabled else ""
        raise Preempted(
            f"stopped by {name}{by} at step {self.state.global_step}: checkpoint {directory} written"
            f"{' and published' if published else ' (publishing did not finish in the budget)'} in "
            f"{time.perf_counter() - started:.1f} s. Continue with --resume auto --run_id {self.run_id}."
        )

    def _close_after_preemption(self) -> bool:
        """Rank 0: the checkpoint is written and was given the budget; close what is open. Whether it was published."""
        published = self.checkpointer.close(timeout_s=0)
        self.history.flush(self.state)
        self.history.sink.finish(exit_code=EXIT_PREEMPTED)
        self.checkpointer.release()
        return published

    # ------------------------------------------------------------------ metrics
    def full_history(self) -> list[dict[str, Any]]:
        """Every logged row of the run, including those before a resume."""
        return self.history.full(self.state)

    def _log_window(self, window: MetricWindow, bar) -> None:
        mean = window.close(self.scheduler.get_last_lr()[0], self.model.routing.dense)
        self.history.log(self.state, mean)
        if bar is not None:
            bar.set_postfix_str(f"loss={mean['train/lm_loss']:.3f} tok/s={mean['train/tokens_per_s']:.0f}")

    # ------------------------------------------------------------------ outputs
    def save_checkpoint(self, wait_s: float | None = None) -> Path:
        """Write a durable checkpoint and publish it (in the background unless ``wait_s`` is given).

        Every rank calls it: the ranks hand rank 0 their RNG states and the whole weights and optimizer
        state (gathered from the shards under FSDP); rank 0 writes; all get its directory."""
        self._saved_step = self.state.global_step
        gathered = GatheredState(rng_states=self.ranks.gather(rng_state()),
                                 weights=trainable_weights(self.model, self.ranks),
                                 optimizer=self.ranks.full_optimizer_state(self.model, self.optimizer),
                                 fingerprint=fingerprint_of(self.model, known=self.fingerprint))
        return self.ranks.on_main(
            lambda: self.checkpointer.save(self.model, self.optimizer, self.scheduler, self.state, self.history,
                                           self.run_record(), wait_s=wait_s, gathered=gathered),
            f"writing the checkpoint of step {self.state.global_step}")

    def run_record(self) -> RunRecord:
        """What a checkpoint's manifest records about this run."""
        return RunRecord(run_id=self.run_id, training_config=self.config.to_dict(), seed=self.config.seed,
                         batches_per_epoch=self.sampler.global_num_batches, train_examples=len(self.train_data),
                         wandb_run_id=self.history.sink.run_id, world_size=self.ranks.world_size,
                         micro_batches_per_step=self.plan.micro_batches_per_step,
                         train_batch_size=self.config.train_batch_size)

    def finish(self) -> dict[str, Any]:
        """The end of the run: final evaluation and checkpoint, publishing, the model, reports, summary."""
        st = self.state
        # The loop may have just evaluated this step, and then saved it: neither is done twice.
        evaluated = st.last_eval_step == st.global_step
        saved_after_eval = evaluated and self.ranks.share(
            self.checkpointer.has_local(st.global_step) if self.ranks.is_main else None)
        if evaluated:
            final_loss = st.last_eval_loss
        else:
            final_loss = self.evaluate()
            self.history.log(self.state, {"eval/loss": final_loss})
            self.early_stopping.record(st, final_loss)
        self.history.flush(st)
        if not saved_after_eval:
            self.save_checkpoint()
        weights = trainable_weights(self.model, self.ranks)  # whole, on rank 0
        try:
            return self.ranks.on_main(lambda: self._finish_on_main(final_loss, weights), "finishing the run")
        finally:
            self._leave_ranks()

    def _finish_on_main(self, final_loss: float, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Rank 0: publishing, the model, the reports and the summary."""
        st = self.state
        # A signal now (the loop is over) only shortens the wait for the store to the preemption budget.
        wait_s = self.config.preemption_budget_s if self.signals.received is not None else self.config.publish_timeout_s
        model_dir, unpublished = self.checkpointer.finish(self.model, self.tokenizer, weights, st.best_step, wait_s)
        reports = end_of_run_reports(self.full_history(), self.model, self.eval_data, self.collator, self.run_dir,
                                     self.config.eval_batch_size, st.maturity_step, sharded=self.ranks.sharded)
        summary = run_summary(self.run_id, st, stop_reason=self.stop_reason, final_loss=final_loss,
                              steps_per_epoch=self.steps_per_epoch, plan=self.plan, num_experts=self.model.num_experts,
                              train_data=self.train_data, eval_data=self.eval_data, data_report=self.data_report,
                              rank0_batches=self.sampler.rank_batches(0), model_dir=model_dir, reports=reports,
                              unpublished=unpublished)
        log.info("summary:\n%s", write_summary(self.run_dir, summary))
        self.history.sink.finish()
        self.checkpointer.release()
        if unpublished:
            raise self.checkpointer.unpublished_error(model_dir, unpublished)
        return summary
