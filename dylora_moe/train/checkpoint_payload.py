"""What a training checkpoint holds, listed in one place, and how it is restored.

    dylora_config.json + dylora_model.safetensors   trainable weights only (a loadable mixture)
    optimizer.pt, scheduler.pt                      torch.save of state dicts, loaded weights_only
    rng.json                                        python, numpy and torch RNG states (rank 0)
    rng_ranks.json                                  with several ranks: every rank's RNG states, in order
    trainer_state.json                              progress: step, epoch, batch within the epoch,
                                                    early stopping, maturity, metric-history length
    manifest.json                                   sha256/size of every file, fingerprint, config,
                                                    data position, W&B run, library versions

Everything loads without executing code. Saves happen at optimizer-step boundaries. The pieces
are passed explicitly: nothing here knows the trainer. The metric history lives beside the
checkpoints (``history.py``); a checkpoint records how many of its rows belong to it.
"""

from __future__ import annotations

import base64
import json
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint.commit import write_checkpoint
from ..checkpoint.fingerprint import ArchitectureFingerprint
from ..checkpoint.format import checkpoint_name
from ..errors import CheckpointError
from ..model import DyLoRAMoE
from ..model.dylora import ADMISSION_KEY, MATURITY_KEY
from .state import TrainerState


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint's manifest records about the run, besides its progress."""

    run_id: str
    training_config: dict[str, Any]
    seed: int
    batches_per_epoch: int  # over every rank, padded to whole optimizer steps
    train_examples: int
    wandb_run_id: str | None
    world_size: int = 1
    micro_batches_per_step: int = 1  # world size x gradient accumulation: with the batch size, the global batch
    train_batch_size: int = 0


@dataclass
class GatheredState:
    """What the ranks hand to rank 0 for a checkpoint (None: take it from the process itself): every
    rank's RNG states, the whole trainable weights (:func:`trainable_weights`) and optimizer state
    (``Ranks.full_optimizer_state``), the fingerprint (taken before the model was distributed). So a
    checkpoint is the same whether one process or several, with or without FSDP, wrote it:
    trainable-only and independent of the world size."""

    rng_states: list[dict] | None = None
    weights: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    fingerprint: dict[str, Any] | None = None


def trainable_weights(model: DyLoRAMoE, ranks: Any) -> dict[str, torch.Tensor]:
    """The model's trainable state whole, in ``DyLoRAMoE.trainable_state_dict``'s layout (what checkpoints
    and the final model hold), on rank 0 (elsewhere only the routing state, the same on every rank).

    A collective: every rank calls it (``ranks``: ``Ranks``). It gathers layer by layer, so nothing of
    the frozen base travels: DCP leaves frozen parameters out by name, and of two tied ones (an output
    embedding tied to the input's) it names one, so the model as a whole would gather the other."""
    state = {f"{name}.{key}": tensor for name, layer in model.adapted_layers()
             for key, tensor in ranks.full_weights(layer).items()}
    state[MATURITY_KEY] = model.routing.mature.clone()
    state[ADMISSION_KEY] = model.routing.admission.clone()
    return state


@dataclass
class TrainingPayload:
    """A checkpoint read into memory: what :func:`restore_weights` and :func:`restore_progress` put back,
    on any rank."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler_step: int
    progress: dict[str, Any]
    rng: list[dict]  # per rank of the run that saved it
    data_state: dict[str, Any]

    @property
    def world_size(self) -> int:
        """Ranks of the run that saved it (older checkpoints: one)."""
        return int(self.data_state.get("world_size", 1))

    @property
    def micro_batches_per_step(self) -> int:
        """Global micro-batches per optimizer step of the run that saved it (older checkpoints: one rank)."""
        if "micro_batches_per_step" in self.data_state:
            return int(self.data_state["micro_batches_per_step"])
        return self.world_size * int(self.data_state.get("gradient_accumulation_steps", 1))


def fingerprint_of(model: DyLoRAMoE, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint a checkpoint of ``model`` records. ``known``: one computed earlier (before FSDP
    sharded the base, whose weights it samples); only the experts' maturity, which training changes, is
    taken from the model now."""
    if known is None:
        return ArchitectureFingerprint.of(model).to_dict()
    return {**known, "maturity": [bool(m) for m in model.routing.mature]}


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_training_checkpoint(parent: Path, model: DyLoRAMoE, optimizer: torch.optim.Optimizer, scheduler: Any,
                             state: TrainerState, history_rows: int, run: RunRecord,
                             gathered: "GatheredState | None" = None) -> Path:
    """Write the checkpoint of ``state.global_step`` durably under ``parent``; its directory.

    ``gathered``: what the ranks contributed (their RNG states, the whole weights and optimizer state,
    the fingerprint). Default: this process's own.
    """
    progress = state.progress(history_rows)
    gathered = gathered or GatheredState()
    rng_states = gathered.rng_states or [rng_state()]
    fingerprint = gathered.fingerprint or ArchitectureFingerprint.of(model).to_dict()

    def write_files(staging: Path) -> None:
        model.save_pretrained(staging, state=gathered.weights)
        torch.save(gathered.optimizer if gathered.optimizer is not None else optimizer.state_dict(),
                   staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        (staging / "rng.json").write_text(json.dumps(rng_states[0]))
        if len(rng_states) > 1:
            (staging / "rng_ranks.json").write_text(json.dumps(rng_states))
        (staging / "trainer_state.json").write_text(json.dumps(progress) + "\n")

    fields = {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "fingerprint": fingerprint,
        "training_config": run.training_config,
        "data_state": {
            "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "seed": run.seed,
            "batches_per_epoch": run.batches_per_epoch, "train_examples": run.train_examples,
            "world_size": run.world_size, "micro_batches_per_step": run.micro_batches_per_step,
            "train_batch_size": run.train_batch_size,
        },
        "wandb": {"run_id": run.wandb_run_id, "step": state.global_step},
        "extra": {"run_id": run.run_id, "eval_loss": state.last_eval_loss},
    }
    return write_checkpoint(parent, checkpoint_name(state.global_step), write_files, fields, overwrite=True)


def read_training_checkpoint(directory: Path) -> TrainingPayload:
    """Everything a resume restores from a verified checkpoint, read into memory (nothing executed)."""
    from safetensors.torch import load_file

    from ..checkpoint.format import read_manifest

    directory = Path(directory)
    rng_file = directory / "rng_ranks.json"
    rng = (json.loads(rng_file.read_text()) if rng_file.is_file()
           else [json.loads((directory / "rng.json").read_text())])
    manifest = read_manifest(directory)
    data_state = dict(manifest.data_state or {})
    data_state.setdefault("gradient_accumulation_steps", manifest.training_config.get("gradient_accumulation_steps", 1))
    return TrainingPayload(
        weights=load_file(str(directory / "dylora_model.safetensors")),
        optimizer=load_tensors_only(directory / "optimizer.pt"),
        scheduler_step=load_tensors_only(directory / "scheduler.pt")["last_epoch"],
        progress=json.loads((directory / "trainer_state.json").read_text()),
        rng=rng, data_state=data_state)


def restore_weights(payload: TrainingPayload, model: DyLoRAMoE) -> bool:
    """Load the checkpoint's trainable weights into the (not yet sharded or wrapped) model; whether
    the model has more experts than the checkpoint (``--grow_experts``: the new ones start fresh)."""
    grown = payload.weights["routing.mature"].numel() < model.num_experts
    model.load_trainable_state_dict(payload.weights, allow_growth=grown)
    return grown


def restore_progress(payload: TrainingPayload, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0,
                     grown: bool = False, load_optimizer: Callable[[dict], None] | None = None) -> TrainerState:
    """Put the optimizer state, the schedule position and this rank's RNGs back; the saved progress.

    After growth the optimizer's moments no longer fit the parameters and start afresh.
    ``load_optimizer``: how to load a whole optimizer state (default ``optimizer.load_state_dict``;
    ``Ranks.load_optimizer_state`` spreads it over the ranks). A rank the saving run did not have
    (resuming on more ranks) keeps the RNG it was seeded with.
    """
    state = TrainerState.from_progress(payload.progress)
    if not grown:
        (load_optimizer or optimizer.load_state_dict)(payload.optimizer)
    continue_schedule(optimizer, scheduler, payload.scheduler_step)
    if rank < len(payload.rng):
        set_rng_state(payload.rng[rank])
    return state


def restore_training_checkpoint(directory: Path, model: DyLoRAMoE, optimizer: torch.optim.Optimizer,
                                scheduler: Any) -> TrainerState:
    """Weights, optimizer, schedule and RNGs of a verified checkpoint, into the set-up pieces of one process."""
    payload = read_training_checkpoint(directory)
    return restore_progress(payload, optimizer, scheduler, grown=restore_weights(payload, model))


def load_tensors_only(path: Path):
    """``torch.load`` restricted to tensors and plain values: nothing in the file is executed.

    A file that needs more (arbitrary pickled objects) is refused with a CheckpointError; the
    library's own message is not shown, since it suggests loading with code execution enabled.
    """
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path.name} of checkpoint {path.parent} holds objects that can only be loaded by executing code "
            "from the file, so it was refused and nothing in it ran. dylora checkpoints hold only tensors and "
            "plain values: this file was replaced or written by another program. Resume from another "
            "checkpoint.") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path.name} of checkpoint {path.parent} cannot be read "
                              f"({type(err).__name__}); resume from another checkpoint.") from None


def continue_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, step: int) -> None:
    """Put the requested schedule at the checkpoint's step.

    Only the position comes from the checkpoint: the peak learning rate and the schedule's length
    are this run's (they may change on resume), and a fresh optimizer (growth) continues the
    schedule instead of restarting it. With an unchanged configuration this is the value the
    uninterrupted run's scheduler computes, by the same expression.
    """
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(optimizer.param_groups, scheduler.base_lrs, lrs):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs
