"""Store faults as the suite's own tests: a fault-injecting proxy (fault_proxy.py) in front of the S3 and GCS
protocol servers the suite runs, and the real clients (s3fs, gcsfs) behind our stores.

Scenarios: a blackout in the middle of a run; a share of connections reset for a whole run; the store gone
for the last steps. Each ends with every checkpoint either confirmed by the store or named in a clear
message (exit 3), nothing local deleted before the store confirmed it, ``latest`` always a complete version
(watched while the run goes on), and ``--resume auto`` publishing what was left. The ``dylora train`` runs are
marked slow; the publisher and fetch alone, through the same faults, are not.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from dylora_moe.checkpoint.directory import list_checkpoints
from dylora_moe.checkpoint.format import MANIFEST_NAME, verify_checkpoint
from dylora_moe.checkpoint.references import fetch
from dylora_moe.checkpoint.stores import BackgroundPublisher, FsspecStore, deadline
from dylora_moe.errors import CheckpointError
from tests.checkpoint.fault_proxy import FaultProxy
from tests.conftest import REPO_ROOT
from tests.train.conftest import small_model_dir  # noqa: F401  (the tiny model the train scenarios use)

pytest.importorskip("s3fs")


def s3_store(url: str, endpoint: str, timeout_s: float | None = None) -> FsspecStore:
    return FsspecStore(url, {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}, timeout_s)


def new_prefix(scheme: str = "s3") -> str:
    return f"{scheme}://ckpt/{uuid.uuid4().hex[:12]}/store"


def complete_versions(store: FsspecStore) -> dict[str, int]:
    """Version -> step of every version whose manifest is stored and whose files all have the sizes it lists."""
    found = {}
    for info in store.list_versions():
        manifest = json.loads(store.fs.cat_file(f"{store.root}/{info.version}/{MANIFEST_NAME}"))
        sizes = {rel: store._size(f"{info.version}/{rel}") for rel in manifest["files"]}
        if all(sizes[rel] == entry["size"] for rel, entry in manifest["files"].items()):
            found[info.version] = info.step
    return found


def verify_every_version(store: FsspecStore, dest: Path) -> dict[str, int]:
    """Download every complete version (checksums verified) and return version -> step."""
    steps = {}
    for info in store.list_versions():
        steps[info.version] = verify_checkpoint(store.download(info.version, dest / info.version)).global_step
    return steps


class StoreWatch:
    """Watches a store directly (not through the proxy) and a run's local checkpoints while the run goes on.

    Violations: ``latest`` naming a version that is not complete; a local checkpoint gone (two polls in a
    row: a step saved again is briefly absent) while the store holds no complete version of its step.
    """

    def __init__(self, store: FsspecStore, checkpoints: Path, interval_s: float = 0.3):
        self.store, self.checkpoints, self.interval_s = store, checkpoints, interval_s
        self.violations: list[str] = []
        self.latest: list[str] = []  # the versions `latest` named, in order
        self.local_seen: set[int] = set()
        self.polls = 0
        self._missing_before: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StoreWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.poll()  # once more, after the run

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        try:
            local = {step for step, _ in list_checkpoints(self.checkpoints)}
        except (OSError, CheckpointError):  # a checkpoint removed while it was being read
            return
        self.local_seen |= local
        missing = self.local_seen - local
        try:
            stored = set(complete_versions(self.store).values())  # listed after the local look: see below
            pointer = self.store._read("aliases/latest.json")
        except Exception:  # the direct view may itself fail under load: skip this poll  # noqa: BLE001
            return
        self.polls += 1
        # A checkpoint deleted before this listing was confirmed before it was deleted, so it must be listed.
        for step in sorted((missing & self._missing_before) - stored):
            self.violations.append(f"local checkpoint of step {step} deleted before the store confirmed it")
        self._missing_before = missing
        if pointer is not None:
            version = json.loads(pointer)["version"]
            if not self.latest or self.latest[-1] != version:
                self.latest.append(version)
            if self.store._size(f"{version}/{MANIFEST_NAME}") is None:
                self.violations.append(f"latest names {version}, which is not complete")


# --- the publisher and fetch with the real clients, through the faults (fast) ----------------------

def publish_through(store: FsspecStore, ckpts, steps) -> BackgroundPublisher:
    publisher = BackgroundPublisher(store, rank=0, timeout_s=60, retries=6, backoff_s=0.05, max_backoff_s=1)
    for step in steps:
        publisher.submit(ckpts[1](step), step, ["latest"])
    assert publisher.close(120) is True
    return publisher


def test_s3_publishing_and_fetching_through_reset_connections(s3_endpoint, ckpts, tmp_path):
    prefix = new_prefix()
    with FaultProxy(s3_endpoint, reset_every=3, reset_after_bytes=200) as proxy:
        store = s3_store(prefix, proxy.url, timeout_s=5)
        publisher = publish_through(store, ckpts, (10, 20, 30, 40))
        path = fetch(f"{prefix}:latest", tmp_path / "dl", timeout_s=10, backoff_s=0.05,
                     storage_options={"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True})
        stats = proxy.stats()
    assert stats.resets >= 5, stats  # a third of the connections died in the middle of a request
    assert not publisher.failed and [job.step for job in publisher.published] == [10, 20, 30, 40]
    direct = s3_store(prefix, s3_endpoint)
    assert sorted(verify_every_version(direct, tmp_path / "check").values()) == [10, 20, 30, 40]
    assert direct.resolve("latest") == publisher.published[-1].version
    assert verify_checkpoint(path).global_step == 40


def test_gcs_publishing_and_fetching_through_reset_connections(ckpts, tmp_path):
    """gcsfs waits a while before each retry, so fewer connections are reset here than for S3."""
    pytest.importorskip("gcsfs")
    from tests.cloud.gcs_emulator import gcs_emulator

    prefix = new_prefix("gs")
    with gcs_emulator("ckpt") as emulator, FaultProxy(emulator, reset_every=5, reset_after_bytes=200) as proxy:
        options = {"endpoint_url": proxy.url, "skip_instance_cache": True}
        store = FsspecStore(prefix, options, timeout_s=5)
        publisher = publish_through(store, ckpts, (10, 20))
        path = fetch(f"{prefix}:latest", tmp_path / "dl", timeout_s=10, backoff_s=0.05, storage_options=options)
        stats = proxy.stats()
        direct = FsspecStore(prefix, {"endpoint_url": emulator, "skip_instance_cache": True})
        assert sorted(verify_every_version(direct, tmp_path / "check").values()) == [10, 20]
        assert direct.resolve("latest") == publisher.published[-1].version
    assert stats.resets >= 3, stats
    assert not publisher.failed and verify_checkpoint(path).global_step == 20


def test_a_fetch_from_a_silent_store_ends_at_its_one_deadline(s3_endpoint, ckpts, tmp_path, monkeypatch, caplog):
    """The real s3fs client behind a proxy that accepts and never answers: the fetch as a whole ends at
    ``timeout_s`` (its clients' own timeouts and retries would take several times longer), logging meanwhile."""
    monkeypatch.setattr(deadline, "STALL_NOTICE_S", 0.5)
    caplog.set_level(logging.WARNING)
    prefix = new_prefix()
    s3_store(prefix, s3_endpoint).publish(ckpts[1](10), 10)
    with FaultProxy(s3_endpoint) as proxy, proxy.blacked_out("silent"):
        with pytest.raises(CheckpointError) as err:
            fetch(f"{prefix}:latest", tmp_path / "dl", timeout_s=2, retries=5,
                  storage_options={"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True})
        held = proxy.stats().held
    assert str(err.value) == (f"Cannot fetch checkpoint '{prefix}:latest': store {prefix} did not answer within 2 s: "
                              "the endpoint is unreachable or silent")
    assert held >= 1
    assert any(r.getMessage().startswith(f"still waiting for store {prefix}: ") for r in caplog.records)


def test_a_fetch_during_a_blackout_that_ends_within_its_deadline_succeeds(s3_endpoint, ckpts, tmp_path):
    prefix = new_prefix()
    s3_store(prefix, s3_endpoint).publish(ckpts[1](10), 10)
    with FaultProxy(s3_endpoint) as proxy:
        proxy.blackout("refuse")

        def back_after_two_refusals():
            wait_for(lambda: proxy.stats().refused >= 2, timeout=60, what="two refused connections")
            proxy.blackout(None)

        threading.Thread(target=back_after_two_refusals, daemon=True).start()
        path = fetch(f"{prefix}:latest", tmp_path / "dl", timeout_s=30, retries=10, backoff_s=0.2,
                     storage_options={"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True})
        stats = proxy.stats()
    assert stats.refused >= 2 and verify_checkpoint(path).global_step == 10


# --- `dylora train` through the faults (slow) -----------------------------------------------------

TRAIN = ["--report_to", "none", "--progress", "false", "--max_seq_length", "64", "--training_subset", "5",
         "--eval_subset", "20", "--train_batch_size", "4", "--eval_steps", "0", "--logging_steps", "1",
         "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "1", "--store_timeout_s", "5"]
STEPS = [2, 4, 6]


class Run:
    """One ``dylora train`` subprocess publishing to ``prefix`` through ``proxy``."""

    def __init__(self, model_dir, out: Path, run_id: str, prefix: str, proxy: FaultProxy, *extra: str):
        self.run_dir = out / run_id
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "WANDB_MODE": "offline", "AWS_ENDPOINT_URL": proxy.url}
        argv = [sys.executable, "-m", "dylora_moe.cli", "train", "--model_name", str(model_dir), "--output_dir",
                str(out), "--run_id", run_id, "--checkpoint_store", prefix, *TRAIN, *extra]
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def wait(self, timeout: float = 600) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(30)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def wait_for(condition, timeout: float = 300, what: str = "") -> None:
    stop = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < stop, f"timed out waiting for {what}"
        time.sleep(0.2)


def confirmed(store: FsspecStore, step: int) -> bool:
    """The store confirmed ``step``: its step alias, written last, exists."""
    try:
        return store._read(f"aliases/step-{step}.json") is not None
    except Exception:  # noqa: BLE001
        return False


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "dylora_model.safetensors")


def assert_same_weights(run_dir: Path, reference: dict) -> None:
    import torch

    weights = final_weights(run_dir)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


def assert_all_published(store: FsspecStore, tmp: Path, watch: StoreWatch) -> dict[str, int]:
    steps = verify_every_version(store, tmp)
    assert set(steps.values()) == set(STEPS), steps  # every checkpoint, each version whole (checksums)
    latest = store.resolve("latest")
    assert steps[latest] == STEPS[-1] and watch.latest[-1] == latest
    assert watch.violations == [], watch.violations
    assert watch.polls >= 3 and watch.local_seen == set(STEPS), (watch.polls, watch.local_seen)
    return steps


def report(scenario: str, stats, steps: dict[str, int], watch: StoreWatch) -> None:
    """The figures of a scenario, shown by ``pytest -rA``."""
    print(f"{scenario}: {stats}; versions verified {steps}; latest named {watch.latest} "
          f"over {watch.polls} polls; violations {watch.violations}")


@pytest.fixture(scope="module")
def reference_weights(small_model_dir, s3_endpoint, tmp_path_factory):  # noqa: F811
    """The final weights of the same run with no fault (through the proxy, watched alike)."""
    out, prefix = tmp_path_factory.mktemp("unfaulted"), new_prefix()
    direct = s3_store(prefix, s3_endpoint)
    with FaultProxy(s3_endpoint) as proxy, StoreWatch(direct, out / "clean" / "checkpoints") as watch:
        run = Run(small_model_dir, out, "clean", prefix, proxy, "--publish_timeout_s", "60")
        assert run.wait() == 0, run.stderr
    report("unfaulted", proxy.stats(), assert_all_published(direct, out / "check", watch), watch)
    return final_weights(out / "clean")


@pytest.mark.slow
def test_a_blackout_in_the_middle_of_a_run(small_model_dir, s3_endpoint, reference_weights, tmp_path):  # noqa: F811
    """The store stops answering (connections accepted, never answered) once step 2 is confirmed, for 12 s:
    the saves of steps 4 and 6 and the end of training fall into it. The stall is logged while it lasts;
    every checkpoint is confirmed once the store is back, and training is untouched by it."""
    prefix = new_prefix()
    direct = s3_store(prefix, s3_endpoint)
    with FaultProxy(s3_endpoint) as proxy, StoreWatch(direct, tmp_path / "blackout" / "checkpoints") as watch:
        run = Run(small_model_dir, tmp_path, "blackout", prefix, proxy, "--publish_timeout_s", "120")
        wait_for(lambda: confirmed(direct, 2) or run.proc.poll() is not None, what="step 2 in the store")
        with proxy.blacked_out("silent"):
            time.sleep(12)
        code = run.wait()
        stats = proxy.stats()
    err = run.stderr
    assert code == 0, err
    assert stats.held >= 1 and stats.blackout_s >= 12, stats
    assert f"still waiting for checkpoint store {prefix} (publishing step-0000000" in err, err
    report("blackout", stats, assert_all_published(direct, tmp_path / "check", watch), watch)
    assert_same_weights(tmp_path / "blackout", reference_weights)


@pytest.mark.slow
def test_every_fifth_connection_reset_for_a_whole_run(small_model_dir, s3_endpoint, reference_weights, tmp_path):  # noqa: F811
    prefix = new_prefix()
    direct = s3_store(prefix, s3_endpoint)
    with FaultProxy(s3_endpoint, reset_every=5, reset_after_bytes=200) as proxy, \
            StoreWatch(direct, tmp_path / "resets" / "checkpoints") as watch:
        run = Run(small_model_dir, tmp_path, "resets", prefix, proxy, "--publish_timeout_s", "120")
        code = run.wait()
        stats = proxy.stats()
    assert code == 0, run.stderr
    assert stats.resets >= 10, stats  # the probe, the listings, uploads and alias writes all met resets
    report("resets", stats, assert_all_published(direct, tmp_path / "check", watch), watch)
    assert_same_weights(tmp_path / "resets", reference_weights)


@pytest.mark.slow
def test_the_store_gone_for_the_last_steps_then_resume_auto_publishes_them(
        small_model_dir, s3_endpoint, reference_weights, tmp_path):  # noqa: F811
    """The store refuses every connection once step 2 is confirmed, until the run has ended: exit 3, the
    message names what was not published, the local copies are kept. ``--resume auto`` with the store back
    publishes them."""
    prefix = new_prefix()
    direct = s3_store(prefix, s3_endpoint)
    checkpoints = tmp_path / "gone" / "checkpoints"
    with FaultProxy(s3_endpoint) as proxy, StoreWatch(direct, checkpoints) as watch:
        run = Run(small_model_dir, tmp_path, "gone", prefix, proxy, "--publish_timeout_s", "3")
        wait_for(lambda: confirmed(direct, 2) or run.proc.poll() is not None, what="step 2 in the store")
        proxy.blackout("refuse")
        code = run.wait()
        proxy.blackout(None)
        stats = proxy.stats()
        err = " ".join(run.stderr.split())
        assert code == 3, run.stderr
        assert "Traceback" not in err
        assert f"checkpoint(s) were not published to {prefix}" in err, err
        assert "step-00000004, step-00000006. Their local copies are kept in" in err, err
        assert "--resume auto --run_id gone" in err
        assert stats.refused >= 1, stats
        kept = {step: verify_checkpoint(path).global_step for step, path in list_checkpoints(checkpoints)}
        assert set(kept) >= {4, 6}, kept  # not deleted: the store never confirmed them
        print(f"gone: exit {code}, local copies kept and verified: {sorted(kept)}")
        assert_same_weights(tmp_path / "gone", reference_weights)

        again = Run(small_model_dir, tmp_path, "gone", prefix, proxy, "--publish_timeout_s", "60", "--resume", "auto")
        assert again.wait() == 0, again.stderr
    assert "was never confirmed" in again.stderr, again.stderr
    report("gone, then --resume auto", stats, assert_all_published(direct, tmp_path / "check", watch), watch)


def test_an_orphaned_upload_write_on_a_reset_connection_leaves_no_traceback(s3_endpoint, caplog):
    """aiohttp's write_bytes task of a reset upload fails unretrieved (its request fails and is retried on its
    own): asyncio would log it with a traceback, which reads like a crash in the middle of a store outage."""
    from aiohttp.client_exceptions import ClientConnectionResetError

    s3_store(new_prefix(), s3_endpoint)  # an s3:// or gs:// store installs the filter
    caplog.set_level(logging.ERROR)
    asyncio_log = logging.getLogger("asyncio")
    error = ClientConnectionResetError("Cannot write to closing transport")
    asyncio_log.error("Task exception was never retrieved\nfuture: <Task finished name='Task-64' "
                      "coro=<ClientRequest.write_bytes() done>>", exc_info=(type(error), error, None))
    asyncio_log.error("Task exception was never retrieved\nfuture: <Task finished coro=<something_else()>>",
                      exc_info=(type(error), error, None))
    assert [r.getMessage().split("coro=<")[1] for r in caplog.records if r.name == "asyncio"] == ["something_else()>>"]
