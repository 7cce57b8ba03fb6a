"""The signal watch: a start-up signal stops start-up even when its exception was swallowed."""

import gc
import signal
import sys

import pytest

from dylora_moe.runtime.signals import SignalWatch, StartupInterrupted


class RaisesInDel:
    """An object whose finalizer runs while the signal arrives: Python cannot propagate from there."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)


def test_a_start_up_signal_swallowed_by_a_finalizer_stops_start_up_at_defer_and_prints_nothing(capsys):
    watch = SignalWatch().install()
    try:
        RaisesInDel()  # dropped at once: its __del__ runs, the handler raises there, Python swallows it
        gc.collect()
        assert watch.received == signal.SIGTERM
        assert "Traceback" not in capsys.readouterr().err  # the unraisable hook kept quiet
        with pytest.raises(StartupInterrupted):
            watch.defer()  # the moment training would start: the signal is acted on
    finally:
        watch.restore()
    assert getattr(sys.unraisablehook, "_dylora_quiet", False)


def test_after_defer_a_signal_is_recorded_not_raised():
    watch = SignalWatch().install()
    try:
        watch.defer()
        signal.raise_signal(signal.SIGTERM)
        assert watch.received == signal.SIGTERM
    finally:
        watch.restore()
