"""The ranks of a ``torchrun`` (or ``accelerate launch``) training, and what they agree on.

``dylora train`` started by a launcher that sets ``WORLD_SIZE`` > 1 (and ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) joins the process group through the environment (``env://``):
NCCL when each rank has a GPU, gloo on CPU. Without a launcher, or with one rank, nothing here
talks to anyone and every call is the single-process answer.

The recipe's rules for several ranks, each written once here:

- **rank 0 is the only writer**: the run directory, the lock, the store, W&B, the metric history
  and the final model belong to rank 0. :meth:`Ranks.on_main` runs such work there and hands its
  result (or its failure) to every rank, so no rank waits forever for a rank that already failed;
- **ranks agree** on every decision that changes the loop: a signal seen by any rank stops all of
  them after the same optimizer step (:meth:`Ranks.first_signal`); the evaluation loss is the sum
  over every rank's share (:meth:`Ranks.sum`), so early stopping decides alike;
- **gradients** of the trainable parameters only are averaged by DDP
  (:func:`wrap_for_gradient_sync`); the frozen base is never registered for synchronisation.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from ..errors import EXIT_PREEMPTED, DyLoRAError
from ..runtime.launcher import launched_world_size
from ..runtime.signals import StartupInterrupted

log = logging.getLogger(__name__)
T = TypeVar("T")


class RankZeroFailed(DyLoRAError):
    """Rank 0 stopped with an error during work done for every rank; the other ranks leave with its exit
    status and a pointer to its message (rank 0 prints the paragraph itself)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Ranks:
    """This process's place among the ranks: ``world_size``, ``rank``, ``local_rank``."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @classmethod
    def from_environment(cls, timeout_s: float = 1800.0) -> "Ranks":
        """Join the process group that the launcher's environment describes (none for one process)."""
        world = launched_world_size()
        if world == 1:
            return cls()
        if not dist.is_initialized():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        ranks = cls(world_size=dist.get_world_size(), rank=dist.get_rank(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=dist.get_backend())
        log.info("rank %d of %d (%s)", ranks.rank, ranks.world_size, ranks.backend)
        return ranks

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # ------------------------------------------------------------------ agreement
    def on_main(self, work: Callable[[], T], what: str) -> T:
        """Run ``work`` on rank 0 only; every rank returns its result, or raises if it failed there.

        ``what`` names the work for the other ranks' message. The result must pickle (it travels
        to the other ranks).
        """
        if not self.enabled:
            return work()
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                result = work()
            except BaseException as err:
                code = EXIT_PREEMPTED if isinstance(err, StartupInterrupted) else getattr(err, "exit_code", 1)
                self._broadcast([("failed", code, f"{type(err).__name__}")])
                raise
            outcome = [("ok", result)]
        self._broadcast(outcome)
        if outcome[0][0] == "failed":
            _, code, kind = outcome[0]
            raise RankZeroFailed(f"rank 0 stopped while {what} ({kind}, exit status {code}); its message above "
                                 f"says why. Rank {self.rank} stops with it.", code)
        return outcome[0][1]

    def share(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        self._broadcast(box)
        return box[0]

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value``, in rank order, on rank 0 (None elsewhere)."""
        if not self.enabled:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def first_signal(self, received: int | None) -> tuple[int | None, int | None]:
        """(signal, rank that got it) if any rank received one, the same answer on every rank."""
        if not self.enabled:
            return received, (0 if received is not None else None)
        # one small all-reduce per step: the lowest rank that saw a signal, with its number
        code = float(self.rank * 1000 + received) if received is not None else float("inf")
        tensor = torch.tensor([code], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        value = tensor.item()
        if value == float("inf"):
            return None, None
        rank, signum = divmod(int(value), 1000)
        return signum, rank

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def _broadcast(self, box: list[Any]) -> None:
        dist.broadcast_object_list(box, src=0, device=self._collective_device())

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


def wrap_for_gradient_sync(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks (``model`` itself otherwise).

    DDP registers only parameters with ``requires_grad``: the LoRA experts and the routers. The
    frozen base is replicated by loading it on every rank and is never all-reduced. Buffers (the
    routing maturity) change identically on every rank, so they are not broadcast at each forward.
    """
    if not ranks.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ranks.local_rank] if ranks.backend == "nccl" else None
    with warnings.catch_warnings():  # torch 2.13 renames it; the new name still syncs at init, which is fine too
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def shard_parameters(model: torch.nn.Module, ranks: Ranks) -> None:
    """Shard the base and the experts over the ranks with FSDP (torch's ``fully_shard``), in place.

    Each decoder layer (the classes the base names in ``_no_split_modules``) becomes one FSDP
    unit, and the whole mixture the root unit: a rank holds 1/world of every parameter, frozen or
    not, and gathers a layer only while it computes it. Gradients are reduce-scattered, so only the
    trainable parameters' gradients travel. Checkpoints gather the trainable tensors whole
    (:func:`whole_optimizer_state`, ``DyLoRAMoE.trainable_state_dict``): they stay trainable-only
    and resume on any number of ranks, with or without FSDP.
    """
    from torch.distributed.fsdp import fully_shard

    base = model.base_model
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in base.modules() if type(m).__name__ in layer_classes]
    if not blocks:
        from ..errors import ConfigError

        raise ConfigError(f"--fsdp: the base model ({type(base).__name__}) names no decoder-layer class in "
                          "_no_split_modules, so it cannot be sharded layer by layer; train without --fsdp.")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    log.info("FSDP: %d decoder layers sharded over %d ranks", len(blocks), ranks.world_size)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """A context in which backward does (``enabled``) or does not yet exchange gradients: DDP's
    ``no_sync``, FSDP's ``set_requires_gradient_sync``; nothing for one process."""
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return nullcontext() if enabled else model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with every sharded tensor gathered whole, on every rank (a collective), in
    ``optimizer.state_dict()``'s own layout: the same file a single process writes."""
    from torch.distributed.tensor import DTensor

    saved = optimizer.state_dict()
    saved["state"] = {index: {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in entry.items()}
                      for index, entry in saved["state"].items()}
    return saved


def load_whole_optimizer_state(optimizer: torch.optim.Optimizer, whole: dict[str, Any]) -> None:
    """Load a whole optimizer state (as :func:`whole_optimizer_state` or one process writes it) into
    an optimizer over sharded parameters: each rank keeps the slices of its own shards."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in whole["state"].items():
        param = params[int(index)]
        state[index] = {
            k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            if isinstance(param, DTensor) and torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in entry.items()}
    optimizer.load_state_dict({**whole, "state": state})
