"""What a training checkpoint holds, listed in one place, and how it is restored.

    dylora_config.json + dylora_model.safetensors   trainable weights only (a loadable mixture)
    optimizer.pt, scheduler.pt                      torch.save of state dicts, loaded weights_only
    rng.json                                        python, numpy and torch RNG states
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
from typing import Any

import numpy as np
import torch

from ..checkpoint.fingerprint import ArchitectureFingerprint
from ..checkpoint.format import checkpoint_name, write_checkpoint
from ..errors import CheckpointError
from ..model import DyLoRAMoE
from .state import TrainerState


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint's manifest records about the run, besides its progress."""

    run_id: str
    training_config: dict[str, Any]
    seed: int
    batches_per_epoch: int
    train_examples: int
    wandb_run_id: str | None


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
                             state: TrainerState, history_rows: int, run: RunRecord) -> Path:
    """Write the checkpoint of ``state.global_step`` durably under ``parent``; its directory."""
    progress = state.progress(history_rows)

    def write_files(staging: Path) -> None:
        model.save_pretrained(staging)
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        (staging / "rng.json").write_text(json.dumps(rng_state()))
        (staging / "trainer_state.json").write_text(json.dumps(progress) + "\n")

    fields = {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "fingerprint": ArchitectureFingerprint.of(model).to_dict(),
        "training_config": run.training_config,
        "data_state": {
            "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "seed": run.seed,
            "batches_per_epoch": run.batches_per_epoch, "train_examples": run.train_examples,
        },
        "wandb": {"run_id": run.wandb_run_id, "step": state.global_step},
        "extra": {"run_id": run.run_id, "eval_loss": state.last_eval_loss},
    }
    return write_checkpoint(parent, checkpoint_name(state.global_step), write_files, fields, overwrite=True)


def restore_training_checkpoint(directory: Path, model: DyLoRAMoE, optimizer: torch.optim.Optimizer,
                                scheduler: Any) -> TrainerState:
    """Load a verified checkpoint into a set-up model, optimizer and scheduler (same fingerprint
    already checked), set the RNGs, and return the saved progress.

    A checkpoint with fewer experts than the model (``--grow_experts``) fills the first slots;
    the optimizer's moments then no longer fit the parameters and start afresh.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = load_file(str(directory / "dylora_model.safetensors"))
    grown = weights["routing.mature"].numel() < model.num_experts
    model.load_trainable_state_dict(weights, allow_growth=grown)
    state = TrainerState.from_progress(json.loads((directory / "trainer_state.json").read_text()))
    if not grown:
        optimizer.load_state_dict(load_tensors_only(directory / "optimizer.pt"))
    continue_schedule(optimizer, scheduler, load_tensors_only(directory / "scheduler.pt")["last_epoch"])
    set_rng_state(json.loads((directory / "rng.json").read_text()))
    return state


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
