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
- **distribution** is :meth:`Ranks.prepare` (DDP, or FSDP with ``--fsdp``): gradients of the
  trainable parameters only are exchanged, the frozen base never is; :meth:`Ranks.gradient_sync`
  holds them back during gradient accumulation;
- **whole state out and in**: :meth:`Ranks.full_weights` and :meth:`Ranks.full_optimizer_state`
  give rank 0 the whole trainable weights and optimizer state, :meth:`Ranks.load_optimizer_state`
  spreads a whole optimizer state over the ranks, with ``torch.distributed.checkpoint.state_dict``
  for DDP, FSDP and one process alike; so checkpoints hold whole tensors, trainable only, and
  resume on any number of ranks.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import EXIT_PREEMPTED, ConfigError, DyLoRAError
from ..runtime.launcher import launched_world_size
from ..runtime.signals import StartupInterrupted

log = logging.getLogger(__name__)
T = TypeVar("T")


def _whole_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # whole tensors (gathered from the shards), on the CPU of rank 0 only; the frozen base left out
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


class RankZeroFailed(DyLoRAError):
    """Rank 0 stopped with an error during work done for every rank; the other ranks leave with its exit
    status and a pointer to its message (rank 0 prints the paragraph itself)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Ranks:
    """This process's place among the ranks (``world_size``, ``rank``, ``local_rank``), and how the
    model is distributed over them (``sharded``: by :meth:`prepare` with FSDP)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    sharded: bool = False

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

    def seed(self, seed: int) -> None:
        """Seed Python's, numpy's and torch's RNGs with ``seed``, alike on every rank (the same initial weights)."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def diverge(self, seed: int) -> None:
        """From here each rank draws its own random numbers (its dropout): every rank but 0 is seeded again
        from ``seed`` and its rank; rank 0 goes on as it is."""
        if self.rank > 0:
            from ..data.mixing import derive_seed

            self.seed(derive_seed(seed, "rank", self.rank))

    # ------------------------------------------------------------------ distribution
    def prepare(self, model: nn.Module, fsdp: bool = False) -> nn.Module:
        """The module to train: ``model`` itself for one process, in DistributedDataParallel for
        several, or (``fsdp``) sharded over them in place by FSDP's ``fully_shard``.

        DDP registers only parameters with ``requires_grad``: the experts and the routers. The frozen
        base is replicated by loading it on every rank and is never all-reduced. Buffers (the
        routing maturity) change identically on every rank, so they are not broadcast at each forward.

        With FSDP each decoder layer (the classes the base names in ``_no_split_modules``) becomes
        one unit, and the whole mixture the root unit: a rank holds 1/world of every parameter,
        frozen or not, and gathers a layer only while it computes it; gradients are reduce-scattered,
        so only the trainable ones travel. The weights must be whole (loaded) before this.
        """
        if not self.enabled:
            if fsdp:
                log.warning("--fsdp has no effect in a single process (start the run with torchrun)")
            return model
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            base = model.base_model
            layer_classes = set(getattr(base, "_no_split_modules", None) or [])
            blocks = [m for m in base.modules() if type(m).__name__ in layer_classes]
            if not blocks:
                raise ConfigError(f"--fsdp: the base model ({type(base).__name__}) names no decoder-layer class in "
                                  "_no_split_modules, so it cannot be sharded layer by layer; train without --fsdp.")
            for block in blocks:
                fully_shard(block)
            fully_shard(model)
            self.sharded = True
            log.info("FSDP: %d decoder layers sharded over %d ranks", len(blocks), self.world_size)
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if self.backend == "nccl" else None
        with warnings.catch_warnings():  # torch 2.13 renames it; the new name still syncs at init, which is fine too
            warnings.simplefilter("ignore", FutureWarning)
            return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    @staticmethod
    def gradient_sync(train_model: nn.Module, enabled: bool):
        """A context in which backward does (``enabled``) or does not yet exchange gradients: DDP's
        ``no_sync``, FSDP's ``set_requires_gradient_sync``; nothing for one process."""
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(train_model, DistributedDataParallel):
            return nullcontext() if enabled else train_model.no_sync()
        if isinstance(train_model, FSDPModule):
            train_model.set_requires_gradient_sync(enabled)
        return nullcontext()

    def full_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The whole trainable weights of ``module`` (named within it, frozen ones left out), on the CPU of
        rank 0 and empty on the other ranks. A collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(module, options=_whole_options())

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The whole state of ``optimizer`` over ``model``'s parameters in ``optimizer.state_dict()``'s own
        layout (what checkpoints hold), on the CPU of rank 0 and empty on the other ranks. A collective.
        ``model``: the model itself, not its DDP wrapper."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if not optimizer.state:  # nothing to gather (and DCP would take a step to create the state)
            return optimizer.state_dict()
        by_name = get_optimizer_state_dict(model, optimizer, options=_whole_options())
        return _by_index(by_name) if by_name else {}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, whole: dict[str, Any]) -> None:
        """Load a whole optimizer state (as :meth:`full_optimizer_state` gives it, or a checkpoint holds it) into
        ``optimizer`` over ``model``'s prepared parameters; each rank keeps its own shards. Every rank
        passes the same whole state."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not whole["state"]:  # no moments yet: nothing to spread (and DCP would take a step to create them)
            optimizer.load_state_dict(whole)
            return
        names = {id(p): name for name, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        set_optimizer_state_dict(model, optimizer, _by_name(whole, order),
                                 options=StateDictOptions(full_state_dict=True))
        for group, saved in zip(optimizer.param_groups, whole["param_groups"]):  # DCP turns tuples (betas) into lists
            group.update({key: value for key, value in saved.items() if key != "params"})

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
        """Leave the process group. Drop the DDP wrapper first: it holds the group, and freeing it after
        the group is destroyed deadlocks gloo."""
        if self.enabled and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()

    def _broadcast(self, box: list[Any]) -> None:
        dist.broadcast_object_list(box, src=0, device=self._collective_device())

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


def _by_index(by_name: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (DCP's layout) in ``optimizer.state_dict()``'s own:
    parameters numbered in the order of the parameter groups (the layout checkpoints hold)."""
    order = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: by_name["state"][name] for name in order if name in by_name["state"]},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def _by_name(by_index: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """The inverse of :func:`_by_index`, for an optimizer whose parameters are named ``order``."""
    return {"state": {order[int(i)]: entry for i, entry in by_index["state"].items()},
            "param_groups": [{**group, "params": [order[int(i)] for i in group["params"]]}
                             for group in by_index["param_groups"]]}
