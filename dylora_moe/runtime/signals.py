"""SIGTERM and SIGINT, from the moment a ``dylora`` process starts until it exits.

Spot VMs are reclaimed at any time, start-up included. ``SignalWatch`` has two modes:

- **start-up** (loading the model and data, checking the store, the base evaluation): a signal
  stops at once by raising :class:`StartupInterrupted` in the main thread. Nothing new exists
  to save then; the previous checkpoints are untouched.
- **deferred** (the training loop and the end of the run): a signal is recorded and the loop
  stops at the next optimizer-step boundary, writes a checkpoint and publishes it within the
  preemption budget.

Both end with exit status 75 (:data:`~dylora_moe.errors.EXIT_PREEMPTED`, raised as
:class:`~dylora_moe.errors.Preempted`). This module imports nothing heavy, so the CLI (and a cloud
job's entrypoint) can install the watch before it imports torch.
"""

from __future__ import annotations

import logging
import signal

from ..errors import Preempted

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupInterrupted(BaseException):
    """A signal arrived before training started; raised from the signal handler.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way (a retry
    loop, a library) swallows it; the trainer and the CLI turn it into :class:`Preempted`.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)

    def as_preempted(self, detail: str = "before anything was saved. Run the same command again to start; "
                     "with --resume auto and the same --run_id a run continues from its newest "
                     "checkpoint.") -> Preempted:
        return Preempted(f"stopped by {signal_name(self.signum)} during start-up, {detail}")


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class SignalWatch:
    def __init__(self) -> None:
        self.received: int | None = None
        self.deferred = False
        self._previous: dict[int, object] = {}

    def install(self) -> "SignalWatch":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        _quiet_when_swallowed()
        return self

    def restore(self) -> None:
        """Give the signals back to whoever had them before ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def defer(self) -> None:
        """From now on a signal is recorded, and acted on at the next optimizer-step boundary.

        A signal that arrived during start-up and whose StartupInterrupted was swallowed (raised while
        a finalizer ran, where Python can only print it) stops the start-up here, before training."""
        if self.received is not None and not self.deferred:
            raise StartupInterrupted(self.received)
        self.deferred = True

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            return  # the first signal decides; a second one must not interrupt the clean stop
        self.received = signum
        if not self.deferred:
            raise StartupInterrupted(signum)
        log.warning("received %s: finishing the current optimizer step, then checkpointing", signal_name(signum))


def _quiet_when_swallowed() -> None:
    """A StartupInterrupted raised while a ``__del__`` runs cannot propagate: Python hands it to
    ``sys.unraisablehook``, which would print a traceback. The watch keeps the signal and acts on it at
    ``defer``, so that hook stays silent for it (and handles everything else as before)."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_dylora_quiet", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, StartupInterrupted):
            return
        previous(unraisable)

    hook._dylora_quiet = True
    sys.unraisablehook = hook
