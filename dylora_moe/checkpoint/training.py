"""What a training checkpoint holds, listed in one place, and how it is restored.

    dylora_config.json + dylora_model.safetensors   trainable weights only (a loadable mixture)
    optimizer.pt, scheduler.pt                      torch.save of state dicts, loaded weights_only
    rng.json                                        python, numpy and torch RNG states
    trainer_state.json                              progress: step, epoch, batch within the epoch,
                                                    early stopping, maturity, metric-history length
    manifest.json                                   sha256/size of every file, fingerprint, config,
                                                    data position, W&B run, library versions

Everything loads without executing code. Saves happen at optimizer-step boundaries.

The metric history (for the routing picture) grows with the run, so it lives beside the
checkpoints in ``RUN_DIR/history.jsonl``, written before each checkpoint; the checkpoint records
how many rows belong to it. A checkpoint therefore costs the same at step 10 and step 10,000.
"""

from __future__ import annotations

import base64
import json
import pickle
import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import CheckpointError
from .fingerprint import ArchitectureFingerprint
from .format import checkpoint_name, write_checkpoint

if TYPE_CHECKING:
    from ..train.trainer import Trainer


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


HISTORY_NAME = "history.jsonl"


def _write_history(run_dir: Path, history: list[dict]) -> None:
    tmp = run_dir / f".{HISTORY_NAME}.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    tmp.replace(run_dir / HISTORY_NAME)


def read_history(run_dir: Path, rows: int) -> list[dict]:
    path = run_dir / HISTORY_NAME
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()[:rows]
    return [json.loads(line) for line in lines]


def save_training_checkpoint(trainer: "Trainer", parent: Path) -> Path:
    st = trainer.state
    history = trainer.full_history()
    _write_history(trainer.run_dir, history)
    progress = {k: v for k, v in asdict(st).items() if k not in ("history", "history_base")}
    progress["history_rows"] = len(history)

    def write_files(staging: Path) -> None:
        trainer.model.save_pretrained(staging)
        torch.save(trainer.optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), staging / "scheduler.pt")
        (staging / "rng.json").write_text(json.dumps(rng_state()))
        (staging / "trainer_state.json").write_text(json.dumps(progress) + "\n")

    fields = {
        "global_step": st.global_step,
        "epoch": st.epoch,
        "fingerprint": ArchitectureFingerprint.of(trainer.model).to_dict(),
        "training_config": trainer.config.to_dict(),
        "data_state": {
            "epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch, "seed": trainer.config.seed,
            "batches_per_epoch": trainer.sampler.num_batches, "train_examples": len(trainer.train_data),
        },
        "wandb": {"run_id": trainer.sink.run_id, "step": st.global_step},
        "extra": {"run_id": trainer.run_id, "eval_loss": st.last_eval_loss},
    }
    return write_checkpoint(parent, checkpoint_name(st.global_step), write_files, fields, overwrite=True)


def restore_training_checkpoint(trainer: "Trainer", directory: Path) -> None:
    """Load a verified checkpoint into a set-up trainer (same fingerprint already checked).

    A checkpoint with fewer experts than the model (``--grow_experts``) fills the first slots;
    the optimizer's moments then no longer fit the parameters and start afresh.
    """
    from safetensors.torch import load_file

    from ..train.trainer import TrainerState

    directory = Path(directory)
    state = load_file(str(directory / "dylora_model.safetensors"))
    model = trainer.model
    grown = state["routing.mature"].numel() < model.num_experts
    model.load_trainable_state_dict(state, allow_growth=grown)
    st = json.loads((directory / "trainer_state.json").read_text())
    trainer.state = TrainerState(**{k: v for k, v in st.items() if k in TrainerState.__dataclass_fields__})
    trainer.state.history_base = st.get("history_rows", 0)  # parsed only when the history is needed
    if not grown:
        trainer.optimizer.load_state_dict(load_tensors_only(directory / "optimizer.pt"))
    _continue_schedule(trainer, load_tensors_only(directory / "scheduler.pt")["last_epoch"])
    set_rng_state(json.loads((directory / "rng.json").read_text()))


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


def _continue_schedule(trainer: "Trainer", step: int) -> None:
    """Put the requested schedule at the checkpoint's step.

    Only the position comes from the checkpoint: the peak learning rate and the schedule's length
    are this run's (they may change on resume), and a fresh optimizer (growth) continues the
    schedule instead of restarting it. With an unchanged configuration this is the value the
    uninterrupted run's scheduler computes, by the same expression.
    """
    scheduler = trainer.scheduler
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(trainer.optimizer.param_groups, scheduler.base_lrs, lrs):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs
