"""The seed's W&B flow end to end, online, with the real client.

Every process is a real ``dylora train`` (``python -m dylora_moe.cli``) whose W&B client (the SDK
and its bundled ``wandb-core``) talks to the local FAKE W&B backend (tests/fakes/wandb_server.py)
through ``WANDB_BASE_URL``: W&B itself is a boundary we cannot reach offline. Each process gets
a fresh home directory (and so an empty W&B cache), as on another machine.

To keep the file fast, the processes run in two waves from one module fixture: first the
publishing run and a run preempted once it has published; then, concurrently, everything that
reads what they left behind (two resumes, a corrupted file, a missing version, an unreachable
backend, and the preempted run's restart). Each test asserts on one of those processes.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from tests.fakes.wandb_client import client_env
from tests.fakes.wandb_server import API_KEY, ENTITY, FakeWandb

pytestmark = pytest.mark.slow

PROJECT = "dylora-moe"  # the default --wandb_project
RUN_ID = "pub-1"
SPOT_ID = "spot-1"
CHECKPOINTS = f"{RUN_ID}-checkpoint"
BEST_FULL = "best-dylora-model-full"
TINY = ["--progress", "false", "--training_subset", "8", "--eval_subset", "10", "--max_seq_length", "128",
        "--train_batch_size", "4", "--logging_steps", "1"]
ONLINE_STORE = ["--report_to", "wandb", "--checkpoint_store", "wandb"]
WEIGHTS = "dylora_model.safetensors"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def closed_port() -> int:
    with socket.socket() as sock:  # bound, then released: nothing listens there afterwards
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Job:
    """One ``dylora train`` process on its own machine (home directory ``home``)."""

    name: str
    home: Path
    argv: list[str]
    proc: subprocess.Popen
    _code: int | None = None

    @property
    def run_dir(self) -> Path:
        run_id = self.argv[self.argv.index("--run_id") + 1]
        return self.home / "out" / run_id

    def log(self) -> str:
        out = (self.home / "stdout.txt").read_text(errors="replace")
        err = (self.home / "stderr.txt").read_text(errors="replace")
        return f"$ dylora {' '.join(self.argv[3:])}\n--- exit {self._code}\n{out[-3000:]}\n{err[-8000:]}"

    def stderr(self) -> str:
        return (self.home / "stderr.txt").read_text(errors="replace")

    def result(self) -> tuple[int, str]:
        if self._code is None:
            self._code = self.proc.wait(timeout=600)
        return self._code, self.log()


class Machines:
    def __init__(self, fake: FakeWandb, root: Path, model_dir: str):
        self.fake, self.root, self.model_dir = fake, root, model_dir

    def start(self, name: str, *args: str, url: str | None = None) -> Job:
        home = self.root / name
        home.mkdir()
        env = client_env(url or self.fake.url, home, MPLCONFIGDIR=str(self.root / "matplotlib"))
        argv = [sys.executable, "-m", "dylora_moe.cli", "train", "--model_name", self.model_dir,
                "--output_dir", str(home / "out"), *TINY, *args]
        with open(home / "stdout.txt", "w") as out, open(home / "stderr.txt", "w") as err:
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=err)
        return Job(name, home, argv, proc)


def wait_until(condition, job: Job, what: str, limit_s: float = 300) -> None:
    """Poll ``condition`` (state of the fake, not a fixed sleep) while ``job`` runs."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if job.proc.poll() is not None:
            pytest.fail(f"{job.name} exited before {what}:\n{job.result()[1]}")
        if time.monotonic() > deadline:
            job.proc.kill()
            pytest.fail(f"{job.name}: no {what} after {limit_s} s:\n{job.result()[1]}")
        time.sleep(0.2)


@dataclass
class Flow:
    fake: FakeWandb
    jobs: dict[str, Job]
    preempted_step: int
    spot_history: list[int]  # global_step of each W&B history row of the preempted run, before its restart


@pytest.fixture(scope="module")
def flow(small_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb-online")
    with FakeWandb() as fake:
        machines = Machines(fake, root, small_model_dir)
        # Wave 1: a run publishing every step, and a long run preempted once it has published.
        publish = machines.start("publish", "--run_id", RUN_ID, *ONLINE_STORE, "--max_steps", "3",
                                 "--save_steps", "1", "--eval_steps", "1")
        spot = machines.start("spot", "--run_id", SPOT_ID, *ONLINE_STORE, "--max_steps", "500",
                              "--save_steps", "2", "--eval_steps", "0")
        wait_until(lambda: fake.artifacts.versions(ENTITY, PROJECT, f"{SPOT_ID}-checkpoint"), spot,
                   "published checkpoint")
        spot.proc.send_signal(signal.SIGTERM)
        for job in (publish, spot):
            job.result()
        code, log = publish.result()
        assert code == 0, log
        stopped = re.search(r"stopped by SIGTERM at step (\d+)", spot.stderr())
        assert spot.result()[0] == 75 and stopped, spot.log()
        step = int(stopped.group(1))
        spot_history = [row.get("global_step") for row in fake.runs[SPOT_ID].history]

        # Wave 2, concurrently: what a second machine does with what wave 1 left in W&B.
        fake.artifacts.corrupt(ENTITY, PROJECT, f"{CHECKPOINTS}:v0", WEIGHTS)
        ref = f"wandb://{ENTITY}/{PROJECT}/{CHECKPOINTS}"
        jobs = {
            "publish": publish, "spot": spot,
            "best": machines.start("best", "--run_id", "from-best", "--report_to", "none", "--max_steps", "3",
                                   "--wandb_checkpoint_artifact", f"{ENTITY}/{PROJECT}/{BEST_FULL}:latest"),
            "v1": machines.start("v1", "--run_id", "from-v1", "--report_to", "none", "--max_steps", "3",
                                 "--resume", f"{ref}:v1"),
            "corrupt": machines.start("corrupt", "--run_id", "from-corrupt", "--report_to", "wandb",
                                      "--max_steps", "3", "--resume", f"{ref}:v0"),
            "missing": machines.start("missing", "--run_id", "from-missing", "--report_to", "none",
                                      "--max_steps", "3", "--resume", f"{ref}:v7"),
            "unreachable": machines.start("unreachable", "--run_id", "from-nowhere", "--report_to", "none",
                                          "--max_steps", "3", "--store_timeout_s", "3", "--resume", f"{ref}:v1",
                                          url=f"http://127.0.0.1:{closed_port()}"),
            "restart": machines.start("restart", "--run_id", SPOT_ID, *ONLINE_STORE, "--resume", "auto",
                                      "--max_steps", str(step + 1), "--save_steps", "2", "--eval_steps", "0"),
        }
        yield Flow(fake, jobs, step, spot_history)
        for job in jobs.values():
            if job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()


def published_run_dir(flow: Flow) -> Path:
    return flow.jobs["publish"].run_dir


def local_checkpoint(flow: Flow, step: int) -> Path:
    return published_run_dir(flow) / "checkpoints" / f"step-{step:08d}"


def received_files_match_their_manifest(files: dict[str, bytes]) -> dict:
    manifest = json.loads(files["manifest.json"])
    assert set(files) == {*manifest["files"], "manifest.json"}, sorted(files)
    for name, entry in manifest["files"].items():
        assert sha256(files[name]) == entry["sha256"] and len(files[name]) == entry["size"], name
    return manifest


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / WEIGHTS)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_becomes_a_new_version_with_latest_best_and_step_aliases(flow):
    artifacts = flow.fake.artifacts
    versions = artifacts.versions(ENTITY, PROJECT, CHECKPOINTS)
    assert [v.version for v in versions] == ["v0", "v1", "v2"], flow.jobs["publish"].log()
    best_step = json.loads((published_run_dir(flow) / "summary.json").read_text())["best_step"]
    aliases = artifacts.aliases(ENTITY, PROJECT, CHECKPOINTS)
    steps = {a: v for a, v in aliases.items() if a.startswith("step-")}
    assert steps == {"step-1": "v0", "step-2": "v1", "step-3": "v2"}
    assert aliases["latest"] == "v2" and aliases["best"] == f"v{best_step - 1}", aliases
    for version, step in zip(versions, (1, 2, 3)):
        assert json.loads(version.metadata)["step"] == step
        manifest = received_files_match_their_manifest(version.files)  # what the backend received is whole
        assert manifest["global_step"] == step
        local = local_checkpoint(flow, step)
        if local.exists():  # retention may have removed older local copies; the newest are kept
            assert version.files["manifest.json"] == (local / "manifest.json").read_bytes()
    assert local_checkpoint(flow, 3).exists()
    assert not flow.fake.errors, flow.fake.errors


def test_best_dylora_model_full_is_the_best_checkpoint_byte_for_byte(flow):
    best_step = json.loads((published_run_dir(flow) / "summary.json").read_text())["best_step"]
    (version,) = flow.fake.artifacts.versions(ENTITY, PROJECT, BEST_FULL)
    assert flow.fake.artifacts.aliases(ENTITY, PROJECT, BEST_FULL) == {
        "latest": "v0", "best": "v0", f"step-{best_step}": "v0"}
    local = local_checkpoint(flow, best_step)
    expected = {p.relative_to(local).as_posix(): sha256(p.read_bytes()) for p in local.rglob("*") if p.is_file()}
    assert {name: sha256(data) for name, data in version.files.items()} == expected
    assert received_files_match_their_manifest(version.files)["global_step"] == best_step


def test_seed_syntax_resumes_best_dylora_model_full_on_an_empty_machine(flow):
    job = flow.jobs["best"]
    code, log = job.result()
    assert code == 0, log
    assert "Traceback" not in log
    best_step = json.loads((published_run_dir(flow) / "summary.json").read_text())["best_step"]
    assert f"at step {best_step}" in log, log
    (download,) = (job.run_dir / "downloads").glob(f"*{BEST_FULL}*-v0")
    assert same_weights(weights(download), weights(local_checkpoint(flow, best_step)))
    # Exact resume: whatever the best step was, going on to step 3 reproduces the first run's step 3.
    assert same_weights(weights(job.run_dir / "final"), weights(local_checkpoint(flow, 3)))
    assert json.loads((job.run_dir / "summary.json").read_text())["steps"] == 3


def test_resume_from_a_checkpoint_version_continues_exactly(flow):
    job = flow.jobs["v1"]
    code, log = job.result()
    assert code == 0, log
    assert "Traceback" not in log
    assert "at step 2" in log, log  # v1 is step 2, not the latest version (step 3)
    (download,) = (job.run_dir / "downloads").glob(f"*{CHECKPOINTS}*-v1")
    version = flow.fake.artifacts.find(ENTITY, PROJECT, f"{CHECKPOINTS}:v1")
    assert {p.name: p.read_bytes() for p in download.iterdir()} == version.files
    trained = weights(job.run_dir / "final")
    assert same_weights(trained, weights(local_checkpoint(flow, 3)))  # one more step, the same as run 1's
    assert not same_weights(trained, weights(download))


def test_corrupted_file_fails_the_resume_naming_it_before_anything_trains(flow):
    job = flow.jobs["corrupt"]
    code, log = job.result()
    assert code == 1, log
    err = job.stderr()
    assert "Traceback" not in err
    assert f"{WEIGHTS} has sha256" in err and f"{CHECKPOINTS}:v0" in err, err
    assert not (job.run_dir / "checkpoints").exists() and not (job.run_dir / "final").exists()
    assert list((job.run_dir / "downloads").iterdir()) == []  # the damaged download was not kept
    assert "from-corrupt" not in flow.fake.runs  # the W&B run was never started


def test_missing_version_lists_the_available_ones(flow):
    job = flow.jobs["missing"]
    code, log = job.result()
    assert code == 1, log
    err = job.stderr()
    assert "Traceback" not in err
    assert f"{ENTITY}/{PROJECT}/{CHECKPOINTS}:v7 cannot be found" in err, err
    for listed in ("v0 ['step-1']", "v1 ['step-2']", "v2 ["):
        assert listed in err, err
    assert not (job.run_dir / "checkpoints").exists()


def test_unreachable_backend_fails_within_the_store_timeout(flow):
    """Nothing listens at WANDB_BASE_URL: the fetch has one deadline, --store_timeout_s (3 s here), for all
    its attempts, then exit 1 before training. Not a login problem, so not told to log in. Whether the
    client's own timeout (also 3 s) or the deadline ends it first depends on the machine's load: either way
    no second attempt of 3 s follows."""
    job = flow.jobs["unreachable"]
    code, log = job.result()
    assert code == 1, log
    err = job.stderr()
    assert "Traceback" not in err
    store = f"wandb://{ENTITY}/{PROJECT}/{CHECKPOINTS}"
    retried = f"Cannot fetch checkpoint '{store}:v1' after [123] attempt\\(s\\): Cannot reach W&B for {store}"
    cut = f"Cannot fetch checkpoint '{store}:v1': store {store} did not answer within 3 s"
    assert re.search(f"{retried}|{cut}", err), err
    assert "wandb login" not in err.splitlines()[-1], err
    assert not (job.run_dir / "checkpoints").exists()


def test_preempted_run_publishes_its_last_checkpoint_and_the_restart_continues_it(flow):
    step, fake = flow.preempted_step, flow.fake
    spot_log = flow.jobs["spot"].stderr()
    assert "and published" in spot_log, spot_log  # within --preemption_budget_s, not "did not finish"
    spot_store = f"{SPOT_ID}-checkpoint"
    preempted = fake.artifacts.find(ENTITY, PROJECT, f"{spot_store}:step-{step}")
    assert preempted is not None, fake.artifacts.aliases(ENTITY, PROJECT, spot_store)
    received_files_match_their_manifest(preempted.files)
    assert flow.spot_history == list(range(1, step + 1)), flow.spot_history
    run = fake.runs[SPOT_ID]

    code, log = flow.jobs["restart"].result()
    assert code == 0, log
    assert f"wandb://{ENTITY}/{PROJECT}/{spot_store}" in log and f"at step {step}" in log, log
    assert run.resumed_as_existing == 1 and run.exit_codes == [75, 0], (run.exit_codes, log)
    assert [row["global_step"] for row in run.history] == [*flow.spot_history, step + 1]
    assert fake.artifacts.aliases(ENTITY, PROJECT, spot_store)["latest"] == \
        fake.artifacts.find(ENTITY, PROJECT, f"{spot_store}:step-{step + 1}").version
    assert not fake.errors, fake.errors


def test_fake_backend_runs_on_its_own_for_manual_trials():
    """``python -m tests.fakes.wandb_server --port PORT`` (docs/wandb-local.md) prints what to export
    and serves until SIGTERM."""
    port = closed_port()
    server = subprocess.Popen([sys.executable, "-m", "tests.fakes.wandb_server", "--port", str(port)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [server.stdout.readline().strip() for _ in range(2)]
        assert lines == [f"export WANDB_BASE_URL=http://127.0.0.1:{port}", f"export WANDB_API_KEY={API_KEY}"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_fake/artifacts", timeout=30) as answer:
            assert json.load(answer) == {}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/_fake/corrupt", method="POST",
                                         data=json.dumps({"artifact": "e/p/a:v0", "path": "x"}).encode())
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(request, timeout=30)
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0 and "Traceback" not in err, err
