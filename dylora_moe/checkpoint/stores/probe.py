"""Finding out at start-up, within a bounded time, whether a store can work.

``probe_store`` runs the store's own ``probe()`` (for object stores a small write, read and
delete) in a worker thread under one deadline. Permanent failures (missing credentials, access
denied, no such bucket) fail at once; transient ones (connection refused, 5xx, timeouts) are
retried with back-off until the deadline. A store that does not answer at all fails when the
deadline passes: the worker thread is abandoned (Python cannot kill a thread), which is harmless
because the process then exits.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Callable, TypeVar

from dylora_moe.checkpoint.stores.base import CheckpointStore, StoreUnreachableError
from dylora_moe.errors import CheckpointError

log = logging.getLogger(__name__)
T = TypeVar("T")

_PERMANENT_TYPES = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                    "RefreshError", "UsageError", "AuthenticationError", "AuthError")
_PERMANENT_TEXT = re.compile(
    r"credential|forbidden|access ?denied|unauthori[sz]ed|no ?such ?bucket|bucket does not exist|"
    r"invalidaccesskeyid|signaturedoesnotmatch|permission|\b40[134]\b", re.IGNORECASE)


class StoreSilent(CheckpointError):
    """No answer within the deadline: not retried (a silent endpoint rarely wakes up in seconds)."""


class StoreAccessError(CheckpointError):
    """A store that cannot work without the user's action (credentials, permissions, address)."""


def is_permanent(error: BaseException) -> bool:
    """Whether retrying ``error`` cannot help: credentials, permissions, a missing bucket."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, StoreAccessError):
            return True
        if isinstance(error, (PermissionError, FileNotFoundError, NotADirectoryError)):
            return True
        if type(error).__name__ in _PERMANENT_TYPES:
            return True
        if not isinstance(error, CheckpointError) and _PERMANENT_TEXT.search(str(error)):
            return True  # our own wrappers' advice mentions credentials: judge the library's error only
        error = error.__cause__ or error.__context__
    return False


def run_with_deadline(fn: Callable[[], T], seconds: float, what: str) -> T:
    """``fn()`` in a worker thread; a CheckpointError naming ``what`` if it takes over ``seconds``."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed back to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, name=f"deadline: {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise StoreSilent(f"{what} did not answer within {seconds:g} s: the endpoint is unreachable or silent")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def probe_store(store: CheckpointStore, timeout_s: float, backoff_s: float = 1.0) -> None:
    """Check that ``store`` can be written, read and cleaned, within ``timeout_s`` in all."""
    deadline = time.monotonic() + timeout_s
    attempt, delay = 0, backoff_s
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            run_with_deadline(store.probe, max(remaining, 0.1), f"checkpoint store {store.url}")
            if attempt > 1:
                log.info("checkpoint store %s answered on attempt %d", store.url, attempt)
            return
        except Exception as e:
            if is_permanent(e):
                raise StoreAccessError(
                    f"checkpoint store {store.url} cannot be used: {_describe(e)}. Nothing was trained. Check "
                    "the credentials (e.g. AWS_* / GOOGLE_APPLICATION_CREDENTIALS / WANDB_API_KEY), the "
                    "permissions and that the bucket exists, or choose another --checkpoint_store.") from e
            remaining = deadline - time.monotonic()
            if remaining <= delay or isinstance(e, StoreSilent):
                spent = timeout_s - max(remaining, 0)
                what = (_describe(e) if isinstance(e, StoreSilent) else
                        f"checkpoint store {store.url} is not usable after {attempt} attempt(s) in {spent:.0f} s: "
                        f"{_describe(e)}")
                raise CheckpointError(f"{what}. Nothing was trained. Check the store's address and the network, "
                                      "or raise --store_timeout_s.") from e
            log.warning("checkpoint store %s: attempt %d failed (%s); retrying in %.0f s", store.url, attempt,
                        _describe(e), delay)
            time.sleep(delay)
            delay *= 2


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, CheckpointError):
        return text.rstrip(".")
    return f"{type(error).__name__}: {text}".rstrip(".")
