"""The background publisher: retries with back-off, budgets, timeouts, rank 0 only."""

from __future__ import annotations

import threading
import time

import pytest

from dylora_moe.checkpoint.format import verify_checkpoint
from dylora_moe.checkpoint.stores import BackgroundPublisher, LocalStore
from dylora_moe.errors import CheckpointError

FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05}


class FlakyStore(LocalStore):
    """A real local store whose first ``failures`` publishes raise a transient error."""

    def __init__(self, root, failures: int):
        super().__init__(root)
        self.failures, self.calls = failures, 0

    def publish(self, local_dir, step, aliases=("latest",)):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"transient failure {self.calls}")
        return super().publish(local_dir, step, aliases)


class HangingStore(LocalStore):
    """A real local store whose publish blocks until ``release`` is set (a stuck network).

    ``entered`` is set when a publish has started; ``finished`` counts the publishes done.
    """

    def __init__(self, root, hang_calls: int = 10**9):
        super().__init__(root)
        self.release, self.hang_calls, self.calls = threading.Event(), hang_calls, 0
        self.entered = threading.Event()
        self.finished = threading.Semaphore(0)

    def publish(self, local_dir, step, aliases=("latest",)):
        self.calls += 1
        self.entered.set()
        if self.calls <= self.hang_calls:
            self.release.wait(30)
        version = super().publish(local_dir, step, aliases)
        self.finished.release()
        return version


def test_submit_returns_while_the_store_is_still_publishing(ckpts, tmp_path):
    store = HangingStore(tmp_path / "store")
    publisher = BackgroundPublisher(store, rank=0, **FAST)
    path = ckpts[1](10)
    publisher.submit(path, 10)  # returns although the store blocks until released
    assert store.entered.wait(10) and store.list_versions() == []
    assert publisher.unconfirmed() == {path}
    store.release.set()
    assert publisher.flush(10) is True and store.resolve("latest") == "v0"


def test_retries_after_transient_failures_then_succeeds(ckpts, tmp_path):
    store = FlakyStore(tmp_path / "store", failures=2)
    publisher = BackgroundPublisher(store, rank=0, retries=3, **FAST)
    path = ckpts[1](10)
    publisher.submit(path, 10, ["latest", "best"])
    assert publisher.flush(10) is True
    [job] = publisher.published
    assert (job.version, job.attempts, store.calls) == ("v0", 3, 3)
    assert store.resolve("latest") == "v0" and store.resolve("best") == "v0"
    assert publisher.failed == [] and verify_checkpoint(path).global_step == 10
    assert publisher.close(1) is True
    with pytest.raises(CheckpointError, match="publisher to .* is closed"):
        publisher.submit(path, 10)


def test_gives_up_after_retries_and_keeps_local_copy(ckpts, tmp_path):
    store = FlakyStore(tmp_path / "store", failures=100)
    publisher = BackgroundPublisher(store, rank=0, retries=2, **FAST)
    path = ckpts[1](10)
    publisher.submit(path, 10)
    assert publisher.flush(10) is True
    [job] = publisher.failed
    assert job.attempts == 3 and "ConnectionError: transient failure 3" in job.error
    assert verify_checkpoint(path).global_step == 10 and store.list_versions() == []


def test_flush_with_a_budget_returns_false_when_the_store_hangs(ckpts, tmp_path):
    store = HangingStore(tmp_path / "store")
    publisher = BackgroundPublisher(store, rank=0, **FAST)
    path = ckpts[1](10)
    publisher.submit(path, 10)
    started = time.monotonic()
    assert publisher.flush(0.3) is False
    assert time.monotonic() - started >= 0.3  # it waited the whole budget (no upper bound: load varies)
    assert verify_checkpoint(path).global_step == 10 and store.list_versions() == []
    assert publisher.close(0.05) is False
    store.release.set()


def test_an_attempt_that_times_out_is_retried(ckpts, tmp_path):
    store = HangingStore(tmp_path / "store", hang_calls=1)
    publisher = BackgroundPublisher(store, rank=0, timeout_s=0.2, retries=2, **FAST)
    publisher.submit(ckpts[1](10), 10)
    assert publisher.flush(10) is True
    [job] = publisher.published
    assert job.attempts == 2 and "took longer than 0.2 s" in job.error
    assert store.resolve("latest") == job.version
    assert store.finished.acquire(timeout=10)  # the retry's publish
    store.release.set()  # the abandoned attempt finishes late, as a further version
    assert store.finished.acquire(timeout=30)
    assert [v.version for v in store.list_versions()] == ["v0", "v1"]


def test_jobs_publish_in_order(ckpts, tmp_path):
    store = LocalStore(tmp_path / "store")
    publisher = BackgroundPublisher(store, rank=0, **FAST)
    for step in (10, 20, 30):
        publisher.submit(ckpts[1](step), step)
    assert publisher.close(10) is True
    assert [(j.step, j.version) for j in publisher.published] == [(10, "v0"), (20, "v1"),
                                                                   (30, "v2")]
    assert store.resolve("latest") == "v2"


def test_only_rank_zero_publishes(ckpts, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    publisher = BackgroundPublisher(store, rank=1)
    publisher.submit(ckpts[1](10), 10)
    assert publisher.flush(1) is True and publisher.close() is True
    monkeypatch.setenv("RANK", "3")
    from_env = BackgroundPublisher(store)
    from_env.submit(ckpts[0] / "step-00000010", 10)
    assert not from_env.enabled and from_env.flush(1) is True
    assert store.list_versions() == [] and not store.root.exists()


def test_unconfirmed_checkpoints_are_protected_from_retention(ckpts, tmp_path):
    from dylora_moe.checkpoint.directory import apply_retention, list_checkpoints

    parent, make = ckpts
    store = HangingStore(tmp_path / "store")
    publisher = BackgroundPublisher(store, rank=0, **FAST)
    paths = [make(step) for step in (10, 20, 30, 40)]
    publisher.submit(paths[0], 10)  # in flight (the store hangs)
    publisher.submit(paths[1], 20)  # queued behind it
    assert store.entered.wait(10)
    assert publisher.unconfirmed() == {paths[0], paths[1]}
    deleted = apply_retention(parent, keep_last=1, keep={p.name for p in publisher.unconfirmed()})
    assert [p.name for p in deleted] == ["step-00000030"]
    assert [step for step, _ in list_checkpoints(parent)] == [10, 20, 40]
    store.release.set()
    assert publisher.flush(10) is True and publisher.unconfirmed() == set()
    assert [v.step for v in store.list_versions()] == [10, 20]


def test_a_step_written_again_while_it_is_being_published_reaches_the_store_whole(ckpts, tmp_path):
    """The final save (or a preemption) may rewrite a step whose upload is still running: the store must get
    one consistent version, never files of both writes."""
    from dylora_moe.checkpoint.commit import write_checkpoint
    from dylora_moe.checkpoint.format import checkpoint_name

    parent, make = ckpts
    first = verify_checkpoint(make(10))
    store = HangingStore(tmp_path / "store", hang_calls=1)
    publisher = BackgroundPublisher(store, rank=0, **FAST)
    publisher.submit(parent / checkpoint_name(10), 10)
    assert store.entered.wait(10)

    def write_other_bytes(staging):  # the same step, saved again with other contents
        (staging / "trainable.safetensors").write_bytes(b"rewritten after the final evaluation")

    write_checkpoint(parent, checkpoint_name(10), write_other_bytes, {"global_step": 10, "epoch": 0}, overwrite=True)
    store.release.set()
    assert publisher.close(10)
    assert publisher.published and not publisher.failed
    stored = verify_checkpoint(store.root / "v0")  # every file matches the manifest stored with it
    assert stored.files == first.files  # and it is the checkpoint as it was when it was submitted
    assert not [p for p in parent.iterdir() if p.name.startswith(".tmp-")]  # the snapshot is gone


def test_closing_removes_the_snapshots_of_jobs_that_never_started(ckpts, tmp_path):
    store = HangingStore(tmp_path / "store")
    publisher = BackgroundPublisher(store, rank=0, **FAST)
    first, second, third = ckpts[1](10), ckpts[1](20), ckpts[1](30)
    for step, path in ((10, first), (20, second), (30, third)):
        publisher.submit(path, step)
    assert store.entered.wait(10)  # step 10 is uploading, 20 and 30 wait in the queue
    assert publisher.close(timeout_s=0.05) is False
    snapshots = sorted(p.name for p in first.parent.iterdir() if "publishing" in p.name)
    assert not [s for s in snapshots if "00000020" in s or "00000030" in s], snapshots
    assert publisher.unconfirmed() == {first, second, third}  # nothing confirmed, all local copies kept
    assert all(p.is_dir() for p in (first, second, third))
    store.release.set()


def test_the_closing_message_counts_the_attempts_it_made(ckpts, tmp_path, caplog):
    store = FlakyStore(tmp_path / "store", failures=10**9)
    publisher = BackgroundPublisher(store, rank=0, retries=5, backoff_s=0.01, max_backoff_s=0.01)
    publisher.submit(ckpts[1](10), 10)
    assert publisher.flush(10)
    publisher.close()
    warnings = [r.getMessage() for r in caplog.records if "failed (attempt" in r.getMessage()]
    assert [w.split("(attempt ")[1].split(")")[0] for w in warnings] == [f"{i} of 6" for i in range(1, 7)]
    (gave_up,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Gave up")]
    assert "after 6 of 6 attempts" in gave_up
