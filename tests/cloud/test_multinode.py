"""Multi-node Vertex jobs: the rendezvous derived from CLUSTER_SPEC, torch's launcher, the job's exit status.

The "nodes" are local processes given the environment Vertex gives each replica (CLUSTER_SPEC
naming 127.0.0.1 and a free port, DYLORA_NPROC_PER_NODE for CPU machines); the launcher, the
rendezvous and the gloo process group are torch's own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.cloud import aiplatform_v1

from dylora_moe.errors import ConfigError
from dylora_moe.job.entrypoint import machine_rendezvous
from dylora_moe.job.launch import describe_failures, job_exit_status
from dylora_moe.job.rendezvous import Rendezvous, from_environment, is_chief, is_launched_rank
from tests.cloud.conftest import run_dylora
from tests.conftest import REPO_ROOT, free_port

# As Vertex AI sets it on a replica (observed shape: "environment", "job" as a JSON string, "open_ports").
VERTEX_SPEC = {"cluster": {"workerpool0": ["cmle-training-workerpool0-4c1d6d97d0-0:2222"],
                           "workerpool1": ["cmle-training-workerpool1-4c1d6d97d0-0:2222",
                                           "cmle-training-workerpool1-4c1d6d97d0-1:2222",
                                           "cmle-training-workerpool1-4c1d6d97d0-2:2222"]},
               "environment": "cloud", "task": {"type": "workerpool0", "index": 0},
               "job": "{\"python_module\":\"\",\"package_uris\":[],\"job_args\":[]}", "open_ports": [3333]}


def spec_for(task_type: str, index: int, spec: dict = VERTEX_SPEC) -> dict[str, str]:
    return {"CLUSTER_SPEC": json.dumps({**spec, "task": {"type": task_type, "index": index}})}


# ------------------------------------------------------------------ CLUSTER_SPEC -> launcher arguments
@pytest.mark.parametrize("task_type, index, node_rank", [("workerpool0", 0, 0), ("workerpool1", 0, 1),
                                                          ("workerpool1", 2, 3)])
def test_every_replica_derives_the_same_rendezvous_and_its_own_node_rank(task_type, index, node_rank):
    rdzv = from_environment(spec_for(task_type, index), gpu_count=lambda: 4)
    assert rdzv == Rendezvous(nnodes=4, node_rank=node_rank, nproc_per_node=4,
                              master_addr="cmle-training-workerpool0-4c1d6d97d0-0", master_port=2222)
    assert rdzv.world_size == 16 and rdzv.distributed
    config = rdzv.launch_config("1234567890", timeout_s=600)
    # what `torchrun --nnodes 4 --node_rank R --nproc_per_node 4 --master_addr A --master_port 2222` configures
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (4, 4, 4)
    assert config.rdzv_backend == "static"
    assert config.rdzv_endpoint == "cmle-training-workerpool0-4c1d6d97d0-0:2222"
    assert config.rdzv_configs == {"rank": node_rank, "timeout": 600}
    assert config.run_id == "1234567890" and config.max_restarts == 0


def test_only_workerpool0_is_the_chief_that_copies_the_model():
    assert is_chief(spec_for("workerpool0", 0)) and is_chief({})
    assert not is_chief(spec_for("workerpool1", 0))


def test_dylora_nproc_per_node_replaces_the_gpu_count():
    env = {**spec_for("workerpool1", 1), "DYLORA_NPROC_PER_NODE": "2"}
    assert from_environment(env, gpu_count=lambda: 8).nproc_per_node == 2
    assert from_environment({}, gpu_count=lambda: 0).nproc_per_node == 1  # a CPU machine runs one process


def test_one_replica_with_one_gpu_stays_in_process_and_several_gpus_launch_locally():
    one = {"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["cmle-training-workerpool0-ab-0:2222"]},
                                       "environment": "cloud", "task": {"type": "workerpool0", "index": 0}})}
    assert not from_environment(one, gpu_count=lambda: 1).distributed
    assert not from_environment({}, gpu_count=lambda: 1).distributed
    local = from_environment(one, gpu_count=lambda: 8)
    assert (local.nnodes, local.nproc_per_node, local.distributed) == (1, 8, True)
    config = local.launch_config("job")
    assert (config.rdzv_backend, config.rdzv_endpoint, config.min_nodes) == ("c10d", "localhost:0", 1)  # --standalone


def test_the_entrypoint_launches_train_only_and_never_inside_a_launched_rank(monkeypatch):
    monkeypatch.setenv("CLUSTER_SPEC", json.dumps({**VERTEX_SPEC, "task": {"type": "workerpool1", "index": 0}}))
    monkeypatch.setenv("DYLORA_NPROC_PER_NODE", "1")
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert machine_rendezvous(["train", "--max_steps", "1"]).node_rank == 1
    assert machine_rendezvous(["eval", "--model", "x"]) is None
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun ... -m dylora_moe.job.entrypoint: already a rank
    assert is_launched_rank() and machine_rendezvous(["train"]) is None


@pytest.mark.parametrize("env, message", [
    ({"CLUSTER_SPEC": "{not json"}, "CLUSTER_SPEC is not valid JSON"),
    ({"CLUSTER_SPEC": '{"cluster": {}}'}, "lacks its \"cluster\" or \"task\" object"),
    ({**spec_for("workerpool2", 0)}, "this replica is in 'workerpool2'; dylora training runs in workerpool0"),
    ({**spec_for("workerpool1", 3)}, "task index 3 is outside workerpool1 (3 replica(s))"),
    ({"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["chief"], "workerpool1": ["w:1"]},
                                  "task": {"type": "workerpool1", "index": 0}})},
     "workerpool0 address 'chief' is invalid: expected HOST:PORT"),
    ({"DYLORA_NPROC_PER_NODE": "0"}, "DYLORA_NPROC_PER_NODE='0' is invalid"),
])
def test_a_malformed_environment_is_a_config_error_naming_it(env, message):
    with pytest.raises(ConfigError) as err:
        from_environment(env, gpu_count=lambda: 1)
    assert message in str(err.value)


def test_the_entrypoint_reports_a_malformed_cluster_spec_in_one_line():
    env = {**os.environ, "CLUSTER_SPEC": json.dumps({**VERTEX_SPEC, "task": {"type": "workerpool3", "index": 0}})}
    result = subprocess.run([sys.executable, "-m", "dylora_moe.job.entrypoint", "--", "train", "--max_steps", "1"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "dylora job: error: CLUSTER_SPEC: this replica is in 'workerpool3'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_entrypoint_help_names_the_environment_it_reads():
    result = subprocess.run([sys.executable, "-m", "dylora_moe.job.entrypoint", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in ("CLUSTER_SPEC", "DYLORA_NPROC_PER_NODE", "DYLORA_RENDEZVOUS_TIMEOUT_S", "AIP_MODEL_DIR"):
        assert name in text
    assert "default one per GPU" in text and "docs/cloud.md, Multi-node" in text


# ------------------------------------------------------------------ exit status of the ranks
@pytest.mark.parametrize("failures, status", [
    ([], 0),
    ([(0, 0), (1, 0)], 0),
    ([(1, 75), (0, 75)], 75),          # preempted: every rank checkpointed and exited 75
    ([(1, 1), (0, 75)], 1),            # a crash, then the others stopped by the launcher
    ([(1, 75), (0, 3)], 3),            # rank 0 failed while the others stopped: not a clean preemption
    ([(0, -9)], 137),                  # killed by SIGKILL (past the launcher's grace period)
    ([(2, -15), (0, 75)], 143),
])
def test_job_exit_status_is_that_of_the_ranks(failures, status):
    assert job_exit_status(failures) == status


def test_failures_are_described_per_rank():
    assert describe_failures([(1, 75), (0, -9)]) == "rank 1: exit 75, rank 0: killed by SIGKILL"


# ------------------------------------------------------------------ two "nodes" meeting through torch's launcher
RANK_PROGRAM = """
import json, os, signal, sys, time
import torch, torch.distributed as dist
from dylora_moe.job.rank import record_status

stop = []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
os.write(1, ("RANK " + json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": total.item(),
         "local_rank": int(os.environ["LOCAL_RANK"]), "node": os.environ["NODE"],
         "omp_threads": os.environ.get("OMP_NUM_THREADS")}) + "\\n").encode())  # one write per line
dist.destroy_process_group()
if os.environ.get("WAIT_FOR_SIGTERM"):
    open(os.path.join(os.environ["READY_DIR"], os.environ["RANK"]), "w").close()
    while not stop:
        time.sleep(0.05)
code = int(os.environ.get("EXIT_" + os.environ["RANK"], "0"))
record_status(code)  # as dylora_moe.job.rank does for `dylora ARGS`
sys.exit(code)
"""

DRIVER = ("import sys; from dylora_moe.job.launch import run_ranks; "
          "from dylora_moe.job.rendezvous import from_environment; "
          "sys.exit(run_ranks(from_environment(), [], 'test-job', program=[sys.argv[1]]))")


def start_node(program: Path, env: dict[str, str]) -> subprocess.Popen:
    inherited = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(program)], cwd=REPO_ROOT,
                            env={**inherited, "PYTHONUNBUFFERED": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ranks_seen(output: str) -> list[dict]:
    # two ranks of a node share its output pipe, so one rank's line can land inside another's
    return [json.loads(found) for found in re.findall(r"RANK (\{[^{}]*\})", output)]


@pytest.fixture
def rank_program(tmp_path) -> Path:
    path = tmp_path / "rank_program.py"
    path.write_text(RANK_PROGRAM)
    return path


def local_cluster(port: int, replicas: int = 2) -> dict:
    return {"cluster": {"workerpool0": [f"127.0.0.1:{port}"],
                        "workerpool1": [f"127.0.0.1:{free_port()}" for _ in range(replicas - 1)]},
            "environment": "cloud"}


@pytest.mark.slow
def test_two_nodes_meet_at_the_chief_and_form_one_world(rank_program):
    cluster = local_cluster(free_port())
    nodes = [start_node(rank_program, {**spec_for(pool, index, cluster), "DYLORA_NPROC_PER_NODE": "2",
                                       "NODE": pool})
             for pool, index in (("workerpool1", 0), ("workerpool0", 0))]  # a worker may start before the chief
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    seen = sorted(ranks_seen("".join(outputs)), key=lambda r: r["rank"])
    # node rank 0 (the chief) holds global ranks 0-1, node rank 1 ranks 2-3; the all-reduce spans all four
    assert [(r["rank"], r["node"], r["local_rank"]) for r in seen] == [
        (0, "workerpool0", 0), (1, "workerpool0", 1), (2, "workerpool1", 0), (3, "workerpool1", 1)]
    assert {r["world"] for r in seen} == {4} and {r["sum"] for r in seen} == {10.0}
    assert {r["omp_threads"] for r in seen} == {"1"}  # as torchrun: 2 processes per machine, 1 thread each
    assert "Traceback" not in "".join(outputs)


@pytest.mark.slow
@pytest.mark.parametrize("rank1_exit, status", [(75, 75), (1, 1)])
def test_sigterm_to_a_node_ends_it_with_its_ranks_status(rank_program, tmp_path, rank1_exit, status):
    """A spot VM's SIGTERM reaches only the container's first process: the launcher passes it on to the
    ranks, waits, and the node exits 75 only if every rank did (after checkpointing, in dylora train)."""
    ready = tmp_path / "ready"
    ready.mkdir()
    node = start_node(rank_program, {"CLUSTER_SPEC": json.dumps({**local_cluster(free_port(), 1),
                                                                 "task": {"type": "workerpool0", "index": 0}}),
                                     "DYLORA_NPROC_PER_NODE": "2", "NODE": "workerpool0", "WAIT_FOR_SIGTERM": "1",
                                     "READY_DIR": str(ready), "EXIT_0": "75", "EXIT_1": str(rank1_exit)})
    deadline = time.monotonic() + 240
    while len(list(ready.iterdir())) < 2 and node.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    node.send_signal(signal.SIGTERM)
    output = node.communicate(timeout=120)[0]
    assert node.returncode == status, output
    assert "Traceback" not in output
    if status == 75:
        assert "every stopped rank checkpointed first" in output
    else:
        assert "training ranks failed (rank 1: exit 1, rank 0: exit 75)" in output or \
               "training ranks failed (rank 0: exit 75, rank 1: exit 1)" in output


@pytest.mark.slow
def test_a_replica_whose_chief_never_comes_stops_with_a_message_naming_it(tmp_path):
    port = free_port()
    env = {**os.environ, **spec_for("workerpool1", 0, local_cluster(port)), "DYLORA_NPROC_PER_NODE": "1",
           "DYLORA_RENDEZVOUS_TIMEOUT_S": "1"}
    result = subprocess.run([sys.executable, "-m", "dylora_moe.job.entrypoint", "--", "train", "--max_steps", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert (f"dylora job: error: node 1 of 2 could not meet the other nodes at 127.0.0.1:{port} within 1 s"
            in result.stderr)
    assert "DYLORA_RENDEZVOUS_TIMEOUT_S sets how long to wait" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ the job `dylora submit vertex` builds
def test_submit_replica_count_2_accelerator_count_4_builds_a_chief_and_a_worker_pool():
    result = run_dylora(["submit", "vertex", "--project", "proj", "--region", "us-central1", "--image",
                         "us-docker.pkg.dev/proj/dylora/dylora:abc1234", "--staging_bucket", "gs://bkt",
                         "--machine_type", "g2-standard-48", "--accelerator_type", "NVIDIA_L4",
                         "--accelerator_count", "4", "--replica_count", "2", "--dry-run", "--", "--max_steps", "10"])
    assert result.returncode == 0, result.stderr
    assert "torch.distributed" not in result.stderr and "WARNING" not in result.stderr
    job = json.loads(result.stdout)
    pools = job["jobSpec"]["workerPoolSpecs"]
    assert [p["replicaCount"] for p in pools] == ["1", "1"]  # the chief (workerpool0) and one worker (workerpool1)
    for pool in pools:
        machine = pool["machineSpec"]
        assert (machine["machineType"], machine["acceleratorType"], machine["acceleratorCount"]) == (
            "g2-standard-48", "NVIDIA_L4", 4)
        assert pool["containerSpec"]["command"] == ["python", "-m", "dylora_moe.job.entrypoint"]
    assert pools[0]["containerSpec"]["args"] == pools[1]["containerSpec"]["args"]  # every replica, one command
    assert aiplatform_v1.CustomJob.from_json(result.stdout).job_spec.worker_pool_specs[1].replica_count == 1


def test_the_multinode_example_of_docs_cloud_md_builds_two_pools_of_four_gpus(tmp_path, monkeypatch, capsys):
    from dylora_moe import cli
    from tests.cloud.test_docs import DOC, commands

    (tmp_path / "job.yaml").write_text(re.search(r"```yaml\n# job.yaml\n(.*?)```", DOC, re.S).group(1))
    monkeypatch.chdir(tmp_path)
    [argv] = [c for c in commands("dylora submit") if "--replica_count" in c]
    assert cli.main(argv[1:]) == 0
    spec = aiplatform_v1.CustomJob.from_json(capsys.readouterr().out).job_spec
    assert [p.replica_count for p in spec.worker_pool_specs] == [1, 1]
    assert {(p.machine_spec.machine_type, p.machine_spec.accelerator_count) for p in spec.worker_pool_specs} == {
        ("g2-standard-48", 4)}
    assert spec.scheduling.restart_job_on_worker_restart


def test_sigterm_while_waiting_at_the_rendezvous_ends_the_replica_at_once(tmp_path):
    """Nothing was trained yet: the launcher's wait for the chief is not interruptible by a Python handler,
    so the replica ends by the signal itself (status 143 in a shell), as docs/cloud.md says."""
    env = {**os.environ, **spec_for("workerpool1", 0, local_cluster(free_port())), "DYLORA_NPROC_PER_NODE": "1",
           "PYTHONUNBUFFERED": "1"}
    node = subprocess.Popen([sys.executable, "-m", "dylora_moe.job.entrypoint", "--", "train", "--max_steps", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in node.stdout:  # the chief never comes: this replica waits at the rendezvous
        lines.append(line)
        if "launching 2 ranks: node 1 of 2" in line:
            break
    time.sleep(1)
    node.send_signal(signal.SIGTERM)
    output = "".join(lines) + node.communicate(timeout=60)[0]
    assert node.returncode == -signal.SIGTERM, output
    assert "Traceback" not in output


# ------------------------------------------------------------------ a real `dylora train` on two "nodes"
def job_command(capsys, *training: str) -> list[str]:
    """Every replica's container command of a 2-replica job (dry run), to run here with this Python."""
    from dylora_moe import cli

    status = cli.main(["submit", "vertex", "--project", "proj", "--region", "us-central1", "--image", "img:1",
                       "--base_output_dir", "gs://bkt/exp", "--replica_count", "2", "--dry-run", "--", *training])
    out = capsys.readouterr().out
    assert status == 0
    pools = aiplatform_v1.CustomJob.from_json(out).job_spec.worker_pool_specs
    commands = [list(p.container_spec.command) + list(p.container_spec.args) for p in pools]
    assert [p.replica_count for p in pools] == [1, 1] and commands[0] == commands[1]
    return [sys.executable, *commands[0][1:]]


TRAINING = ["--report_to", "none", "--training_subset", "2", "--max_seq_length", "64", "--train_batch_size", "2",
            "--eval_steps", "0", "--logging_steps", "1"]


def start_replicas(command: list[str], disks: dict[str, Path], job_id: str, port: int,
                   model_dir: Path) -> list[subprocess.Popen]:
    """The job's two replicas as Vertex starts them: each on its own VM (working directory), same command."""
    cluster = local_cluster(port)
    replicas = []
    for pool, disk in disks.items():
        disk.mkdir()
        env = {**os.environ, **spec_for(pool, 0, cluster), "DYLORA_NPROC_PER_NODE": "1", "CLOUD_ML_JOB_ID": job_id,
               "AIP_MODEL_DIR": str(model_dir), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1"}
        replicas.append(subprocess.Popen(command, cwd=disk, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
    return replicas


def vms(tmp_path: Path, start: int) -> dict[str, Path]:
    return {pool: tmp_path / f"vm-{pool}-start{start}" for pool in ("workerpool0", "workerpool1")}


@pytest.mark.slow
def test_a_two_replica_job_trains_on_both_nodes_survives_a_preempted_worker_and_writes_once(
        small_model_dir, tmp_path, capsys):
    """Spot preemption hits one VM: SIGTERM to the worker replica's entrypoint. Both replicas exit 75 after
    rank 0 published the checkpoint; Vertex restarts them on fresh VMs, they meet again, continue from it
    and finish: one model trained by two nodes, written by rank 0 on the chief only."""
    from dylora_moe.checkpoint.directory import list_checkpoints
    from dylora_moe.checkpoint.format import read_manifest
    from dylora_moe.checkpoint.stores import open_store

    steps, job = 12, "4343"
    store, model_dir = tmp_path / "bucket" / "store", tmp_path / "bucket" / "model"  # gs://... to every replica
    command = job_command(capsys, "--model_name", small_model_dir, "--max_steps", str(steps), "--save_steps", "1",
                          *TRAINING, "--checkpoint_store", str(store))
    disks = vms(tmp_path, 1)
    chief, worker = start_replicas(command, disks, job, free_port(), model_dir)
    first = disks["workerpool0"] / "runs" / job / "checkpoints" / "step-00000001"
    deadline = time.monotonic() + 300
    while not first.exists() and chief.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGTERM)
    outputs = [node.communicate(timeout=300)[0] for node in (chief, worker)]
    assert [chief.returncode, worker.returncode] == [75, 75], "\n\n".join(outputs)
    assert "Traceback" not in "".join(outputs)
    assert "launching 2 ranks: node 0 of 2, 1 process(es) per node, rendezvous at chief 127.0.0.1:" in outputs[0]
    assert "launching 2 ranks: node 1 of 2" in outputs[1]
    assert "received SIGTERM: the ranks of this node were asked to stop" in outputs[1]
    assert "every stopped rank checkpointed first (rank 1: exit 75)" in outputs[1]
    assert "every stopped rank checkpointed first (rank 0: exit 75)" in outputs[0]
    preempted_at = max(v.step for v in open_store(str(store)).list_versions())
    assert 1 <= preempted_at < steps and not model_dir.exists()

    disks = vms(tmp_path, 2)  # the restart: new VMs, empty disks, the same command
    nodes = start_replicas(command, disks, job, free_port(), model_dir)
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(outputs)
    assert "Traceback" not in "".join(outputs)
    assert f"at step {preempted_at}" in outputs[0]
    # rank 0 (on the chief) is the only writer: the run directory, the checkpoints, the store's versions
    run_dir = disks["workerpool0"] / "runs" / job
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert checkpoints and checkpoints[-1][0] == steps
    assert read_manifest(checkpoints[-1][1]).data_state["world_size"] == 2  # one model trained by both nodes
    assert not (disks["workerpool1"] / "runs").exists() and "Published" not in outputs[1]
    published = [int(step) for step in re.findall(r"Published \S+ to \S+ as v\d+ \(aliases \[.*'step-(\d+)'\]\)",
                                                    outputs[0])]
    assert [v.step for v in open_store(str(store)).list_versions()][-len(published):] == published  # one per save
    # and only the chief copied the trained mixture to AIP_MODEL_DIR (a worker has no final/ to copy)
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(p.name for p in (run_dir / "final").iterdir())
