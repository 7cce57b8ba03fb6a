"""Finding out at start-up, within a bounded time, whether a store can work.

``probe_store`` runs the store's own ``probe()`` (for object stores a small write, read and
delete) under one deadline (``deadline.py``), logging while it waits. Permanent failures (missing
credentials, access denied, no such bucket) fail at once; transient ones (connection refused, 5xx,
timeouts) are retried with back-off until the deadline. A store that does not answer at all fails
when the deadline passes: the worker thread is abandoned (Python cannot kill a thread), which is
harmless because the process then exits.
"""

from __future__ import annotations

import logging
import re

from ...errors import CheckpointError
from .base import CheckpointStore
from .deadline import Deadline, StoreSilent, describe_error, retry_within

log = logging.getLogger(__name__)

_PERMANENT_TYPES = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                    "RefreshError", "UsageError", "AuthenticationError", "AuthError")
_PERMANENT_TEXT = re.compile(
    r"credential|forbidden|access ?denied|unauthori[sz]ed|no ?such ?bucket|bucket does not exist|"
    r"invalidaccesskeyid|signaturedoesnotmatch|permission|\b40[134]\b", re.IGNORECASE)


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


def probe_store(store: CheckpointStore, timeout_s: float, backoff_s: float = 1.0) -> None:
    """Check that ``store`` can be written, read and cleaned, within ``timeout_s`` in all."""
    what = f"checkpoint store {store.url}"
    deadline = Deadline(timeout_s, what)
    try:
        retry_within(deadline, store.probe, what, retryable=lambda e: not is_permanent(e), backoff_s=backoff_s)
    except StoreSilent as e:
        raise CheckpointError(f"{describe_error(e)}. Nothing was trained. Check the store's address and the "
                              "network, or raise --store_timeout_s.") from e
    except Exception as e:
        if is_permanent(e):
            raise StoreAccessError(
                f"checkpoint store {store.url} cannot be used: {describe_error(e)}. Nothing was trained. Check "
                "the credentials (e.g. AWS_* / GOOGLE_APPLICATION_CREDENTIALS / WANDB_API_KEY), the "
                "permissions and that the bucket exists, or choose another --checkpoint_store.") from e
        raise CheckpointError(
            f"checkpoint store {store.url} is not usable after {deadline.attempts} attempt(s) in "
            f"{min(deadline.elapsed(), timeout_s):.0f} s: {describe_error(e)}. Nothing was trained. Check the "
            "store's address and the network, or raise --store_timeout_s.") from e
    if deadline.attempts > 1:
        log.info("checkpoint store %s answered on attempt %d", store.url, deadline.attempts)
