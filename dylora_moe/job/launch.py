"""Start this machine's training ranks with torch's own launcher, and turn their ends into one exit status.

``run_ranks`` hands a :class:`~dylora_moe.job.rendezvous.Rendezvous` to
``torch.distributed.launcher.api.elastic_launch`` (what ``torchrun`` runs): it meets the other
nodes, starts ``nproc_per_node`` processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set, forwards SIGTERM to them (a spot VM's notice goes to the
container's first process only) and waits. Each process runs ``python -m dylora_moe.job.rank
ARGS``, which records its exit status for :func:`job_exit_status`.

The exit status of the machine is that of its ranks: 0 when every rank succeeded; 75 when every rank
that stopped early was preempted after checkpointing (:data:`EXIT_PREEMPTED`); otherwise the status of
the first rank that failed for another reason (a rank killed by signal N counts as 128 + N).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import EXIT_PREEMPTED, DyLoRAError
from .rendezvous import Rendezvous, rendezvous_timeout_s

log = logging.getLogger("dylora_moe.job.launch")

STATUS_DIR_ENV = "DYLORA_RANK_STATUS_DIR"  # where each launched rank records its exit status
RANK_MODULE = "dylora_moe.job.rank"


class RendezvousFailed(DyLoRAError):
    """The nodes of a job could not meet (a node missing, the chief unreachable)."""


def exit_code_of(code: int) -> int:
    """A process's status as a shell reports it: killed by signal N (``Popen``'s -N) is 128 + N."""
    return 128 - code if code < 0 else code


def job_exit_status(failures: Iterable[tuple[int, int]]) -> int:
    """The machine's exit status from its failed ranks, ``(rank, exit status)`` in the order they ended."""
    codes = [exit_code_of(code) for _, code in failures if code != 0]
    if not codes:
        return 0
    if all(code == EXIT_PREEMPTED for code in codes):
        return EXIT_PREEMPTED
    return next(code for code in codes if code != EXIT_PREEMPTED)


def describe_failures(failures: list[tuple[int, int]]) -> str:
    return ", ".join(f"rank {rank}: {'killed by ' + signal.Signals(-code).name if code < 0 else f'exit {code}'}"
                     for rank, code in failures)


def _recorded_statuses(status_dir: Path, rendezvous: Rendezvous) -> list[tuple[int, int]]:
    """``(rank, status)`` of this node's ranks from their records, oldest first; no record: killed (SIGKILL)."""
    found: list[tuple[float, int, int]] = []
    first_rank = rendezvous.node_rank * rendezvous.nproc_per_node
    for local_rank in range(rendezvous.nproc_per_node):
        record = status_dir / f"local-rank-{local_rank}"
        try:
            found.append((record.stat().st_mtime, first_rank + local_rank, int(record.read_text().strip())))
        except (OSError, ValueError):  # ended without recording: the launcher had to kill it
            found.append((float("inf"), first_rank + local_rank, -int(signal.SIGKILL)))
    return [(rank, code) for _, rank, code in sorted(found)]


def run_ranks(rendezvous: Rendezvous, args: list[str], run_id: str, program: list[str] | None = None) -> int:
    """Run ``python -m dylora_moe.job.rank ARGS`` (or ``program ARGS``) as this machine's ranks; the exit status."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    config = rendezvous.launch_config(run_id, rendezvous_timeout_s())
    command = [sys.executable, *(program or ["-m", RANK_MODULE]), *args]
    log.info("launching %s", rendezvous.describe())
    if rendezvous.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"  # as torchrun does: N processes must not each take every core
        log.info("OMP_NUM_THREADS=1 for each of the %d processes on this machine (set it to override)",
                 rendezvous.nproc_per_node)
    with tempfile.TemporaryDirectory(prefix="dylora-ranks-") as status_dir:
        os.environ[STATUS_DIR_ENV] = status_dir  # the launcher gives its environment to every rank
        try:
            elastic_launch(config, command[0])(*command[1:])
            return 0
        except ChildFailedError as err:  # a rank ended with a non-zero status; the launcher stopped the others
            ended = sorted(err.failures.items(), key=lambda item: item[1].timestamp)  # stable: capture order
            failures = [(rank, failure.exitcode) for rank, failure in ended]
        except SignalException as err:  # this machine was told to stop; the launcher passed it on and waited
            log.warning("received %s: the ranks of this node were asked to stop", err.sigval.name)
            failures = [(rank, code) for rank, code in _recorded_statuses(Path(status_dir), rendezvous) if code]
        except (RendezvousError, DistError) as err:  # DistNetworkError, DistStoreError: the chief unreachable
            raise RendezvousFailed(
                f"node {rendezvous.node_rank} of {rendezvous.nnodes} could not meet the other nodes at "
                f"{rendezvous.master_addr or 'localhost'}:{rendezvous.master_port or 'a local port'} within "
                f"{config.rdzv_configs['timeout']} s "
                f"({type(err).__name__}: {' '.join(str(err).split())[:300].rstrip('.')}). "
                "Every replica of the job must start and reach the chief's address (workerpool0 in CLUSTER_SPEC); "
                "DYLORA_RENDEZVOUS_TIMEOUT_S sets how long to wait.") from err
        finally:
            os.environ.pop(STATUS_DIR_ENV, None)
    status = job_exit_status(failures)
    if failures:
        summary = describe_failures(failures)
        if status == EXIT_PREEMPTED:
            log.warning("every stopped rank checkpointed first (%s): exit %d, the same command resumes",
                        summary, status)
        else:
            log.error("training ranks failed (%s): exit %d", summary, status)
    return status
