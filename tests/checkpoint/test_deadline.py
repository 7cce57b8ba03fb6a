"""One deadline for a store operation and its retries, and the log line while a store call stalls
(checkpoint/stores/deadline.py), with hanging and failing fakes at the store boundary.

No wall-clock upper bounds: the tests count attempts and read the errors and log lines."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from dylora_moe.checkpoint import references
from dylora_moe.checkpoint.format import verify_checkpoint
from dylora_moe.checkpoint.references import fetch
from dylora_moe.checkpoint.stores import BackgroundPublisher, LocalStore, StoreUnreachableError, deadline
from dylora_moe.checkpoint.stores.deadline import Deadline, StoreSilent, call, retry_within
from dylora_moe.checkpoint.stores.probe import probe_store
from dylora_moe.errors import CheckpointError


@pytest.fixture(autouse=True)
def quick_notices(monkeypatch):
    """A stall is logged after 0.05 s here, not 5 s."""
    monkeypatch.setattr(deadline, "STALL_NOTICE_S", 0.05)


@pytest.fixture
def release():
    """Set at the end of the test: every hanging fake returns then (its abandoned thread ends)."""
    event = threading.Event()
    yield event
    event.set()


def stall_lines(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"still waiting for {what}: ")]


class HangingStore(LocalStore):
    """A real local store whose ``resolve`` or ``probe`` hangs (a store that accepts and never answers)."""

    def __init__(self, root, release: threading.Event):
        super().__init__(root)
        self.release, self.calls = release, 0

    def resolve(self, ref):
        self.calls += 1
        self.release.wait(30)
        return super().resolve(ref)

    def probe(self):
        self.calls += 1
        self.release.wait(30)


class FailingStore(LocalStore):
    """A real local store that cannot be reached: every resolve fails at once, as a refused connection does."""

    def __init__(self, root):
        super().__init__(root)
        self.calls = 0

    def resolve(self, ref):
        self.calls += 1
        raise StoreUnreachableError(f"Store {self.url} failed while resolving {ref!r}: ConnectionRefusedError")


class SlowDownloadStore(LocalStore):
    """A real local store that moves each file in ``seconds_per_file`` (a slow link that keeps flowing)."""

    def __init__(self, root, seconds_per_file: float):
        super().__init__(root)
        self.seconds_per_file = seconds_per_file

    def _download(self, key, local_path):
        time.sleep(self.seconds_per_file)
        super()._download(key, local_path)


def use_store(monkeypatch, store) -> str:
    """``fetch`` opens ``store`` for its address; returns a reference to its ``latest``."""
    monkeypatch.setattr(references, "open_store", lambda address, **_: store)
    return f"{store.url}:latest"


# --- the helper itself --------------------------------------------------------------------------

def test_call_returns_the_value_or_raises_the_error_of_the_call():
    assert call(lambda: 42, "store x", 5) == 42
    with pytest.raises(ZeroDivisionError):
        call(lambda: 1 / 0, "store x", 5)


def test_a_call_that_hangs_ends_at_the_deadline_and_is_logged_while_it_waits(release, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(StoreSilent, match=r"^store s3://b/run did not answer within 0.3 s: the endpoint is "
                                          r"unreachable or silent$"):
        call(lambda: release.wait(30), "store s3://b/run", 0.3)
    lines = stall_lines(caplog, "store s3://b/run")
    assert lines, caplog.text
    assert all(" s so far, giving up in " in line for line in lines), lines


def test_a_call_without_a_deadline_is_logged_for_as_long_as_it_stalls(caplog):
    caplog.set_level(logging.WARNING)
    assert call(lambda: time.sleep(0.3) or "done", "store gs://b/run (publishing step-00000010)") == "done"
    lines = stall_lines(caplog, "store gs://b/run (publishing step-00000010)")
    assert len(lines) >= 2 and "giving up" not in lines[0], lines  # repeated while it lasted; no limit to announce


def test_retries_stop_when_the_deadline_leaves_no_time_for_another_attempt():
    """A store that fails at once, retries unlimited: the deadline, not a count, ends them. Back-off
    0.2 s, 0.4 s, ... within 0.5 s leaves room for two attempts at most, however slow the machine."""
    calls = []

    def refused():
        calls.append(time.monotonic())
        raise StoreUnreachableError("connection refused")

    limit = Deadline(0.5, "store x")
    with pytest.raises(StoreUnreachableError, match="connection refused"):
        retry_within(limit, refused, "store x", retryable=lambda e: True, backoff_s=0.2)
    assert 1 <= len(calls) <= 2 and limit.attempts == len(calls)


def test_a_retry_cut_short_by_the_deadline_reports_what_the_store_said(release):
    """The first attempt was refused, the retry hangs until the deadline: the error is the refusal (it
    says what is wrong), not 'did not answer'."""
    answers = iter([StoreUnreachableError("connection refused by 127.0.0.1:9"), None])

    def attempt():
        error = next(answers)
        if error is not None:
            raise error
        release.wait(30)

    limit = Deadline(0.5, "store x")
    with pytest.raises(StoreUnreachableError, match="connection refused by 127.0.0.1:9"):
        retry_within(limit, attempt, "store x", retryable=lambda e: True, backoff_s=0.01)
    assert limit.attempts == 2


def test_a_transfer_is_given_time_for_its_size_once():
    limit = Deadline(15, "store x")
    limit.allow_transfer(120_000_000)
    limit.allow_transfer(50_000_000)  # a retry of the same download: no second allowance
    assert limit.total_s == pytest.approx(15 + 120)
    assert limit.describe() == "15 s plus 120 s for 120 MB"
    assert Deadline(3, "store x").describe() == "3 s"


# --- fetch: one deadline for every remote fetch -------------------------------------------------

def test_a_fetch_from_a_store_that_hangs_ends_at_one_deadline_without_a_second_attempt(
        tmp_path, monkeypatch, release, caplog):
    caplog.set_level(logging.WARNING)
    store = HangingStore(tmp_path / "store", release)
    ref = use_store(monkeypatch, store)
    with pytest.raises(CheckpointError) as err:
        fetch(ref, tmp_path / "dl", timeout_s=0.5, retries=5, backoff_s=0.01)
    assert str(err.value) == (f"Cannot fetch checkpoint {ref!r}: store {store.url} did not answer within 0.5 s: "
                              "the endpoint is unreachable or silent")
    assert store.calls == 1  # not retries + 1 attempts of the timeout each
    assert stall_lines(caplog, f"store {store.url}")
    assert not (tmp_path / "dl").exists() or not list((tmp_path / "dl").iterdir())


def test_a_fetch_from_a_store_that_refuses_is_retried_only_within_the_deadline(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    store = FailingStore(tmp_path / "store")
    ref = use_store(monkeypatch, store)
    with pytest.raises(CheckpointError) as err:
        fetch(ref, tmp_path / "dl", timeout_s=0.5, retries=20, backoff_s=0.2)
    assert 1 <= store.calls <= 2  # 21 attempts were allowed by count: the deadline ended them
    assert str(err.value).startswith(f"Cannot fetch checkpoint {ref!r} after {store.calls} attempt(s): Store "
                                     f"{store.url} failed while resolving 'latest'")
    retried = [r.getMessage() for r in caplog.records if "attempt 1 failed" in r.getMessage()]
    assert len(retried) == store.calls - 1


def test_a_download_that_keeps_flowing_gets_time_for_its_size(tmp_path, monkeypatch, ckpts):
    """0.3 s to reach the store; each file takes 0.2 s: too slow for 0.3 s alone, fine with the transfer
    allowance (the checkpoint's size at the slowest rate allowed)."""
    store = SlowDownloadStore(tmp_path / "store", seconds_per_file=0.2)
    source = ckpts[1](10)
    store.publish(source, 10)
    ref = use_store(monkeypatch, store)
    with pytest.raises(CheckpointError, match=r"did not answer within 0.3 s plus"):
        fetch(ref, tmp_path / "dl-real-rate", timeout_s=0.3, retries=0)  # 1 MB/s: a few ms for these bytes
    monkeypatch.setattr(deadline, "MIN_TRANSFER_BYTES_PER_S", verify_checkpoint(source).total_size / 3)  # 3 s
    path = fetch(ref, tmp_path / "dl", timeout_s=0.3, retries=0)
    assert verify_checkpoint(path).global_step == 10


class HangingWandbApi:
    """``wandb.Api`` of a backend that accepts and never answers."""

    def __init__(self, release: threading.Event):
        self.release, self.calls = release, 0

    def artifact(self, name, type=None):
        self.calls += 1
        self.release.wait(30)
        raise ConnectionError("no answer")


class RefusingWandbApi:
    """``wandb.Api`` of a backend that refuses every request at once."""

    def __init__(self):
        self.calls = 0

    def artifact(self, name, type=None):
        self.calls += 1
        raise ConnectionError("connection refused")

    def artifact_collection_exists(self, name, type):
        raise ConnectionError("connection refused")


def test_a_wandb_fetch_from_a_backend_that_hangs_ends_at_one_deadline(tmp_path, release, caplog):
    caplog.set_level(logging.WARNING)
    api = HangingWandbApi(release)
    store = "wandb://team/dylora/run1-checkpoint"
    with pytest.raises(CheckpointError) as err:
        fetch(f"{store}:latest", tmp_path / "dl", wandb_api=api, timeout_s=0.5, retries=2, backoff_s=0.01)
    assert str(err.value) == (f"Cannot fetch checkpoint '{store}:latest': store {store} did not answer within "
                              "0.5 s: the endpoint is unreachable or silent")
    assert api.calls == 1  # the issue: up to 3 attempts of the timeout each
    assert stall_lines(caplog, f"store {store}")


def test_a_wandb_fetch_from_a_backend_that_refuses_is_retried_within_the_deadline(tmp_path):
    api = RefusingWandbApi()
    store = "wandb://team/dylora/run1-checkpoint"
    with pytest.raises(CheckpointError) as err:
        fetch(f"{store}:latest", tmp_path / "dl", wandb_api=api, timeout_s=0.5, retries=20, backoff_s=0.2)
    assert 1 <= api.calls <= 2
    assert str(err.value).startswith(f"Cannot fetch checkpoint '{store}:latest' after {api.calls} attempt(s): "
                                     f"W&B artifact team/dylora/run1-checkpoint:latest cannot be fetched")


# --- the start-up probe and the publisher log their stalls too ------------------------------------

def test_a_probe_that_hangs_fails_at_its_deadline_and_is_logged_while_it_waits(tmp_path, release, caplog):
    caplog.set_level(logging.WARNING)
    store = HangingStore(tmp_path / "store", release)
    with pytest.raises(CheckpointError) as err:
        probe_store(store, 0.4, backoff_s=0.01)
    assert str(err.value).startswith(f"checkpoint store {store.url} did not answer within 0.4 s: the endpoint is "
                                     "unreachable or silent. Nothing was trained.")
    assert store.calls == 1
    assert stall_lines(caplog, f"checkpoint store {store.url}")


class HangingPublishStore(LocalStore):
    def __init__(self, root, release: threading.Event):
        super().__init__(root)
        self.release = release

    def publish(self, local_dir, step, aliases=("latest",)):
        self.release.wait(30)
        return super().publish(local_dir, step, aliases)


def test_a_publish_that_stalls_is_logged_while_it_lasts_and_then_completes(ckpts, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    release = threading.Event()
    store = HangingPublishStore(tmp_path / "store", release)
    publisher = BackgroundPublisher(store, rank=0, backoff_s=0.01)
    publisher.submit(ckpts[1](10), 10)
    what = f"checkpoint store {store.url} (publishing step-00000010, attempt 1 of 6)"
    for _ in range(200):  # the first line comes after 0.05 s
        if stall_lines(caplog, what):
            break
        time.sleep(0.05)
    assert stall_lines(caplog, what), caplog.text
    release.set()
    assert publisher.close(10) is True
    assert [job.version for job in publisher.published] == ["v0"] and store.resolve("latest") == "v0"
