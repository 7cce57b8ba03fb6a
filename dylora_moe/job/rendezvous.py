"""Where a cloud job's training ranks meet: nodes, node rank, processes per node, the chief's address.

Vertex AI describes a CustomJob's replicas in the ``CLUSTER_SPEC`` environment variable of every
container, for example on the second replica of the worker pool::

    {"cluster": {"workerpool0": ["cmle-training-workerpool0-ab12-0:2222"],
                 "workerpool1": ["cmle-training-workerpool1-ab12-0:2222", "cmle-training-workerpool1-ab12-1:2222"]},
     "environment": "cloud", "task": {"type": "workerpool1", "index": 1}, "job": "..."}

``dylora submit vertex`` puts the chief in ``workerpool0`` (one replica) and the other replicas in
``workerpool1``, so the nodes are every address of those two pools, the node rank is 0 on the
chief and ``1 + index`` on a worker, and the ranks meet at the chief's ``host:port`` (a static
rendezvous: the chief's launcher serves the store there, the others connect to it).

Processes per node: ``DYLORA_NPROC_PER_NODE`` when set (CPU machines, tests), otherwise one per
visible GPU (``torch.cuda.device_count()``), at least one. Vertex also sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` for some jobs; those describe nodes, not
processes, and the launcher replaces them in every rank with its own per-process values.

One node with one process is not distributed: the training runs in the entrypoint's process as before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError

CLUSTER_SPEC_ENV = "CLUSTER_SPEC"
NPROC_ENV = "DYLORA_NPROC_PER_NODE"
RENDEZVOUS_TIMEOUT_ENV = "DYLORA_RENDEZVOUS_TIMEOUT_S"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 900  # replicas of one job can start minutes apart (image pulls)
CHIEF_POOL, WORKER_POOL = "workerpool0", "workerpool1"
# The variables by which a launcher (torchrun, our own) tells a process that it is one rank of a group.
LAUNCHED_RANK_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")


@dataclass(frozen=True)
class Rendezvous:
    """This machine's part in the training: ``nnodes`` x ``nproc_per_node`` ranks in all."""

    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1
    master_addr: str | None = None  # the chief's host; None on a single node (a local rendezvous)
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        where = f"chief {self.master_addr}:{self.master_port}" if self.nnodes > 1 else "this machine"
        return (f"{self.world_size} ranks: node {self.node_rank} of {self.nnodes}, {self.nproc_per_node} "
                f"process(es) per node, rendezvous at {where}")

    def launch_config(self, run_id: str, timeout_s: int = DEFAULT_RENDEZVOUS_TIMEOUT_S) -> Any:
        """The ``torch.distributed.launcher.api.LaunchConfig`` of this machine's launcher.

        Several nodes meet in a static rendezvous at the chief (``torchrun --nnodes N --node_rank R
        --master_addr A --master_port P``); one node meets on a free local port (``torchrun
        --standalone``). Workers are never restarted by the launcher: a failed or preempted rank
        ends the job, and Vertex's restart runs the same command, which resumes from the newest
        checkpoint.
        """
        from torch.distributed.launcher.api import LaunchConfig

        if self.nnodes > 1:
            backend, endpoint = "static", f"{self.master_addr}:{self.master_port}"
            rdzv_configs = {"rank": self.node_rank, "timeout": timeout_s}
        else:
            backend, endpoint, rdzv_configs = "c10d", "localhost:0", {"timeout": timeout_s}
        return LaunchConfig(min_nodes=self.nnodes, max_nodes=self.nnodes, nproc_per_node=self.nproc_per_node,
                            run_id=run_id, role="dylora-train", rdzv_backend=backend, rdzv_endpoint=endpoint,
                            rdzv_configs=rdzv_configs, max_restarts=0, monitor_interval=1.0)


def _host_port(address: Any, where: str) -> tuple[str, int]:
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{CLUSTER_SPEC_ENV}: {where} address {address!r} is invalid: expected HOST:PORT.")
    return host.strip("[]"), int(port)


def _parse_cluster_spec(text: str) -> tuple[list[Any], list[Any], str, int]:
    """(chief addresses, worker addresses, this replica's pool, its index in the pool)."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{CLUSTER_SPEC_ENV} is not valid JSON ({e}); Vertex AI sets it to "
                          '{"cluster": {"workerpool0": ["HOST:PORT"], ...}, '
                          '"task": {"type": ..., "index": ...}}.') from e
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    task = spec.get("task") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError(f"{CLUSTER_SPEC_ENV} {text!r} lacks its \"cluster\" or \"task\" object.")
    chief, workers = cluster.get(CHIEF_POOL) or [], cluster.get(WORKER_POOL) or []
    if not isinstance(chief, list) or not isinstance(workers, list) or len(chief) != 1:
        raise ConfigError(f"{CLUSTER_SPEC_ENV}: {CHIEF_POOL} must list exactly one address (the chief), and "
                          f"{WORKER_POOL} a list of addresses; got {cluster!r}.")
    pool, index = task.get("type", CHIEF_POOL), task.get("index", 0)
    if pool not in (CHIEF_POOL, WORKER_POOL):
        raise ConfigError(f"{CLUSTER_SPEC_ENV}: this replica is in {pool!r}; dylora training runs in {CHIEF_POOL} "
                          f"(the chief) and {WORKER_POOL} (the other replicas) only, as `dylora submit vertex` "
                          "creates them.")
    size = len(chief) if pool == CHIEF_POOL else len(workers)
    if not isinstance(index, int) or not 0 <= index < size:
        raise ConfigError(f"{CLUSTER_SPEC_ENV}: task index {index!r} is outside {pool} ({size} replica(s)).")
    return chief, workers, pool, index


def processes_per_node(environ: dict[str, str] | None = None,
                       gpu_count: Callable[[], int] | None = None) -> int:
    """``DYLORA_NPROC_PER_NODE`` if set, else the number of visible GPUs, at least 1."""
    environ = os.environ if environ is None else environ
    given = environ.get(NPROC_ENV, "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ConfigError(f"{NPROC_ENV}={given!r} is invalid: give the number of training processes per "
                              "machine, an integer >= 1 (unset: one per GPU).")
        return int(given)
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count
    return max(1, int(gpu_count()))


def rendezvous_timeout_s(environ: dict[str, str] | None = None) -> int:
    """``DYLORA_RENDEZVOUS_TIMEOUT_S``: how long a node waits for the others (default 900 s)."""
    environ = os.environ if environ is None else environ
    given = environ.get(RENDEZVOUS_TIMEOUT_ENV, "").strip()
    if not given:
        return DEFAULT_RENDEZVOUS_TIMEOUT_S
    if not given.isdigit() or int(given) < 1:
        raise ConfigError(f"{RENDEZVOUS_TIMEOUT_ENV}={given!r} is invalid: give whole seconds >= 1.")
    return int(given)


def is_launched_rank(environ: dict[str, str] | None = None) -> bool:
    """True in a process that a launcher already started as one rank (it must not launch again)."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in LAUNCHED_RANK_ENV)


def is_chief(environ: dict[str, str] | None = None) -> bool:
    """The chief replica (``workerpool0``), or the only machine of a job without ``CLUSTER_SPEC``."""
    environ = os.environ if environ is None else environ
    text = environ.get(CLUSTER_SPEC_ENV, "").strip()
    return not text or _parse_cluster_spec(text)[2] == CHIEF_POOL


def from_environment(environ: dict[str, str] | None = None,
                     gpu_count: Callable[[], int] | None = None) -> Rendezvous:
    """This machine's :class:`Rendezvous`, from ``CLUSTER_SPEC`` and the processes per node."""
    environ = os.environ if environ is None else environ
    nproc = processes_per_node(environ, gpu_count)
    text = environ.get(CLUSTER_SPEC_ENV, "").strip()
    if not text:
        return Rendezvous(nproc_per_node=nproc)
    chief, workers, pool, index = _parse_cluster_spec(text)
    nnodes = len(chief) + len(workers)
    for i, address in enumerate(workers):
        _host_port(address, f"{WORKER_POOL}[{i}]")
    if nnodes == 1:
        return Rendezvous(nproc_per_node=nproc)
    host, port = _host_port(chief[0], CHIEF_POOL)
    node_rank = 0 if pool == CHIEF_POOL else 1 + index
    return Rendezvous(nnodes=nnodes, node_rank=node_rank, nproc_per_node=nproc, master_addr=host, master_port=port)
