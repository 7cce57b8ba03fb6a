"""Publishing in the background, so training never waits for a store.

``BackgroundPublisher`` owns one worker thread and a FIFO queue. ``submit`` returns at once; the
worker publishes jobs one at a time, in order (so ``latest`` only moves forward), giving each
attempt ``timeout_s`` and retrying failures with exponential back-off. An attempt that stalls is
logged while it lasts (``deadline.call``); one that times out is abandoned (Python cannot kill a
thread) and the job is retried as a new version. The local checkpoint is never deleted here:
retention is the trainer's decision.

A job publishes from a snapshot of the checkpoint taken at ``submit`` (hard links, so it costs
no copy): the trainer may write the same step again (after the final evaluation, or at a
preemption right after a periodic save) while an upload from it is still running, and the store
must never receive a mixture of the two. Snapshots are ``.tmp-`` folders beside the checkpoint,
removed when the job ends (or by ``cleanup_partial`` after a crash).

At preemption the trainer calls ``flush(budget_s)``, which waits for the queue to drain and says
whether everything was published in time. Only rank 0 publishes: on any other rank (``rank`` or
the ``RANK`` environment variable) the publisher accepts jobs and does nothing.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ...errors import CheckpointError
from ..commit import TMP_PREFIX
from ..format import checkpoint_name
from .base import DEFAULT_ALIASES, CheckpointStore
from .deadline import StoreSilent, call
from .probe import is_permanent

log = logging.getLogger(__name__)


@dataclass
class PublishJob:
    local_dir: Path  # the checkpoint, as retention and restarts know it
    step: int
    aliases: tuple[str, ...]
    source: Path | None = None  # the snapshot the upload reads (local_dir itself where none was taken)
    attempts: int = 0
    running: int = 0  # attempts whose thread has not ended (an abandoned one may still be uploading)
    ended: bool = False
    version: str | None = None
    error: str | None = None


class BackgroundPublisher:
    def __init__(self, store: CheckpointStore, *, rank: int | None = None,
                 timeout_s: float = 600.0, retries: int = 5, backoff_s: float = 2.0,
                 max_backoff_s: float = 120.0):
        self.store = store
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.enabled = self.rank == 0
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.published: list[PublishJob] = []
        self.failed: list[PublishJob] = []
        self._queue: collections.deque[PublishJob] = collections.deque()
        self._pending = 0
        self._current: PublishJob | None = None
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._worker = None
        if self.enabled:
            self._worker = threading.Thread(target=self._run, name="checkpoint-publisher",
                                            daemon=True)
            self._worker.start()

    def submit(self, local_dir: Path, step: int, aliases: Sequence[str] = DEFAULT_ALIASES) -> None:
        """Queue a verified local checkpoint for publishing; returns immediately."""
        if not self.enabled:
            return
        if self._closed.is_set():
            raise CheckpointError(f"Cannot publish {local_dir}: the publisher to "
                                  f"{self.store.url} is closed.")
        local_dir = Path(local_dir)
        job = PublishJob(local_dir, step, tuple(aliases), source=_snapshot(local_dir))
        with self._cond:
            self._queue.append(job)
            self._pending += 1
            self._cond.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` (None: forever) until every submitted job is done.

        True when nothing is pending (jobs that failed every retry are in ``failed``).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._pending == 0

    def unconfirmed(self) -> set[Path]:
        """Local checkpoints the store has not confirmed: queued, in flight, or given up on."""
        with self._cond:
            jobs = [*self._queue, *([self._current] if self._current else []), *self.failed]
            return {job.local_dir for job in jobs}

    def close(self, timeout_s: float | None = None) -> bool:
        """Flush within ``timeout_s``, then stop the worker; returns what ``flush`` returned."""
        done = self.flush(timeout_s)
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
            never_started = list(self._queue)
        for job in never_started:  # their uploads will not run: their snapshots go now, not at the next start
            if job.source is not None and job.source != job.local_dir:
                shutil.rmtree(job.source, ignore_errors=True)
        if not done:
            log.warning("Closing the publisher to %s with %d checkpoint(s) unpublished; the "
                        "local copies are kept.", self.store.url, self._pending)
        return done

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed.is_set():
                    self._cond.wait()
                if self._closed.is_set():
                    return
                job = self._queue.popleft()
                self._current = job
            try:
                self._publish_with_retries(job)
            finally:
                self._attempt_over(job, job_ended=True)
                with self._cond:
                    self._pending -= 1
                    self._current = None
                    self._cond.notify_all()

    def _publish_with_retries(self, job: PublishJob) -> None:
        delay, total = self.backoff_s, self.retries + 1
        while True:
            job.attempts += 1
            try:
                job.version = self._attempt(job)
                self.published.append(job)
                return
            except Exception as e:
                job.error = f"{type(e).__name__}: {e}"
                permanent = is_permanent(e)
                log.warning("Publishing %s to %s failed (attempt %d of %d%s): %s", job.local_dir,
                            self.store.url, job.attempts, total,
                            "; not retried: retrying cannot fix it" if permanent else "", job.error)
            if permanent:
                why = f"after attempt {job.attempts} of {total}: retrying cannot fix the error"
                break
            if job.attempts >= total:
                why = f"after {job.attempts} of {total} attempts"
                break
            if self._closed.wait(delay):
                why = f"after {job.attempts} of {total} attempts: the publisher was closed before the next one"
                break
            delay = min(delay * 2, self.max_backoff_s)
        self.failed.append(job)
        log.error("Gave up publishing %s to %s %s; the local copy is kept. Last error: %s",
                  job.local_dir, self.store.url, why, job.error)

    def _attempt_over(self, job: PublishJob, job_ended: bool = False) -> None:
        """Remove the job's snapshot once the job has ended and no attempt still reads it."""
        with self._cond:
            if job_ended:
                job.ended = True
            else:
                job.running -= 1
            last = job.ended and job.running == 0
        if last and job.source != job.local_dir:
            shutil.rmtree(job.source, ignore_errors=True)

    def _attempt(self, job: PublishJob) -> str:
        def publish() -> str:
            try:
                return self.store.publish(job.source, job.step, job.aliases)
            finally:
                self._attempt_over(job)

        with self._cond:
            job.running += 1
        what = (f"checkpoint store {self.store.url} (publishing {checkpoint_name(job.step)}, attempt "
                f"{job.attempts} of {self.retries + 1})")
        try:
            return call(publish, what, self.timeout_s)
        except StoreSilent:
            raise TimeoutError(f"publishing took longer than {self.timeout_s:g} s; abandoned") from None


def _snapshot(checkpoint: Path) -> Path:
    """Hard links to every file of ``checkpoint`` in a ``.tmp-`` folder beside it (copies where the
    file system has no hard links): later writes of the same step replace the files, not these."""
    snapshot = checkpoint.parent / f"{TMP_PREFIX}publishing-{checkpoint.name}-{secrets.token_hex(4)}"
    try:
        shutil.copytree(checkpoint, snapshot, copy_function=_link_or_copy)
    except OSError as e:
        shutil.rmtree(snapshot, ignore_errors=True)
        log.warning("Cannot snapshot %s for publishing (%s); publishing it in place", checkpoint, e)
        return checkpoint
    return snapshot


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
