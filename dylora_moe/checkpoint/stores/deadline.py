"""One deadline for a store operation and all its retries, and a log line while a store call stalls.

A store call (a probe, a fetch, a publish) runs in a worker thread that the caller waits for:
Python cannot interrupt a thread blocked on a socket, so :func:`call` stops *waiting* when the
deadline passes and raises :class:`StoreSilent`; the abandoned worker ends with its own request
timeout or with the process. While a call lasts longer than ``STALL_NOTICE_S`` a warning says
what it waits for and for how long, again every ``STALL_NOTICE_S``: an outage shows in the log
while it lasts, not only when the call finally gives up.

A :class:`Deadline` is the one point in time by which a whole operation must be done, retries
included; :func:`retry_within` retries transient failures with back-off only while the deadline
leaves time for the pause and another attempt. A fetch's deadline is the store timeout (to reach
the store and learn what to download) plus, once the size of the checkpoint is known,
``allow_transfer``: one second per MB (``MIN_TRANSFER_BYTES_PER_S``), so a large checkpoint that
is flowing is never cut while a silent store still fails in bounded time.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Callable, TypeVar

from ...errors import CheckpointError

log = logging.getLogger(__name__)
T = TypeVar("T")

STALL_NOTICE_S = 5.0  # a store call that has not returned after this long is logged, and again every this long
MIN_TRANSFER_BYTES_PER_S = 1_000_000  # the slowest transfer a fetch's deadline allows for: one second per MB
DEFAULT_FETCH_TIMEOUT_S = 15.0  # a fetch's time to reach the store when none is given (as --store_timeout_s)

_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("store_deadline", default=None)


class StoreSilent(CheckpointError):
    """No answer within the deadline: not retried (no time is left for another attempt)."""


class Deadline:
    """``seconds`` from now for ``what`` (a store operation), retries included.

    ``allow_transfer(nbytes)`` adds the time a transfer of ``nbytes`` may take, once (the largest
    size asked for counts): retrying a download does not grant its transfer time again.
    """

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = float(seconds), what
        self.started = time.monotonic()
        self.transfer_bytes = 0
        self.attempts = 0  # calls made under this deadline

    @property
    def transfer_s(self) -> float:
        return self.transfer_bytes / MIN_TRANSFER_BYTES_PER_S

    @property
    def total_s(self) -> float:
        return self.seconds + self.transfer_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.total_s - self.elapsed()

    def allow_transfer(self, nbytes: int) -> None:
        self.transfer_bytes = max(self.transfer_bytes, int(nbytes))

    def describe(self) -> str:
        """The budget in words: ``15 s`` or ``15 s plus 120 s for 120 MB``."""
        if not self.transfer_bytes:
            return f"{self.seconds:g} s"
        return f"{self.seconds:g} s plus {self.transfer_s:.3g} s for {self.transfer_bytes / 1e6:.3g} MB"

    def silent(self, what: str | None = None) -> StoreSilent:
        return StoreSilent(f"{what or self.what} did not answer within {self.describe()}: the endpoint is "
                           "unreachable or silent")

    @staticmethod
    def current() -> Deadline | None:
        """The deadline of the :func:`call` this thread runs for, if any (``install_download`` extends it)."""
        return _current.get()


def call(fn: Callable[[], T], what: str, deadline: Deadline | float | None = None, *,
         notice_s: float | None = None) -> T:
    """``fn()`` in a worker thread: its value, its error, or :class:`StoreSilent` once ``deadline`` passes.

    ``deadline``: a :class:`Deadline` shared with other calls, a number of seconds for this call
    alone, or None (wait as long as it takes). While the call lasts, a warning naming ``what`` is
    logged every ``notice_s`` (``STALL_NOTICE_S``).
    """
    if deadline is not None and not isinstance(deadline, Deadline):
        deadline = Deadline(deadline, what)
    notice_s = STALL_NOTICE_S if notice_s is None else notice_s
    if deadline is not None:
        deadline.attempts += 1
        if deadline.remaining() <= 0:
            raise deadline.silent(what)
    result: dict[str, object] = {}

    def target() -> None:
        _current.set(deadline)
        try:
            result["value"] = fn()
        except BaseException as e:  # handed back to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, name=f"store call: {what}", daemon=True)
    started = time.monotonic()
    next_notice = started + notice_s
    worker.start()
    while True:
        wait = next_notice - time.monotonic()
        if deadline is not None:
            wait = min(wait, deadline.remaining())  # read each time: the call may allow a transfer meanwhile
        worker.join(max(wait, 0.0))
        if not worker.is_alive():
            break
        if deadline is not None and deadline.remaining() <= 0:
            raise deadline.silent(what)
        now = time.monotonic()
        if now >= next_notice:
            limit = f", giving up in {deadline.remaining():.0f} s" if deadline is not None else ""
            log.warning("still waiting for %s: %.0f s so far%s", what, now - started, limit)
            next_notice = now + notice_s
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def retry_within(deadline: Deadline, fn: Callable[[], T], what: str, *, retryable: Callable[[BaseException], bool],
                 backoff_s: float = 1.0, max_attempts: int | None = None) -> T:
    """``fn()`` under ``deadline``, retried with exponential back-off after a ``retryable`` error.

    Another attempt is made only while ``deadline`` leaves time for the pause and more
    (``deadline.attempts`` counts them); otherwise the last error is raised as it was. When the
    deadline passes during a retry, the error of the attempt before it is raised (it says what is
    wrong with the store); :class:`StoreSilent` only when the store never answered at all.
    """
    delay, first, last = backoff_s, deadline.attempts, None
    while True:
        try:
            return call(fn, what, deadline)
        except StoreSilent:
            if last is None:
                raise
            raise last  # the store's own error (its cause kept): the retry was merely cut short
        except Exception as e:
            made = deadline.attempts - first
            if not retryable(e) or (max_attempts is not None and made >= max_attempts) \
                    or deadline.remaining() <= delay:
                raise
            last = e
            log.warning("%s: attempt %d failed (%s); retrying in %.1f s (%.0f s left of %s)", what, made,
                        describe_error(e), delay, deadline.remaining(), deadline.describe())
        time.sleep(delay)
        delay *= 2


def describe_error(error: BaseException) -> str:
    """One line: our own errors' text, or the library's error type and text."""
    text = " ".join(str(error).split())
    if isinstance(error, CheckpointError):
        return text.rstrip(".")
    return f"{type(error).__name__}: {text}".rstrip(".")
