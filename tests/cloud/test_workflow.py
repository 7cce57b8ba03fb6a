"""The seed's cloud workflow, simulated end to end on this machine.

A "job" is the container's command exactly as ``dylora submit vertex`` put it into the CustomJob,
run as a subprocess with the environment Vertex sets (``CLOUD_ML_JOB_ID``, ``AIP_MODEL_DIR``,
``AIP_CHECKPOINT_DIR``, ...), its secrets in the fake Secret Manager, and its ``gs://`` outputs in a
real GCS protocol server on loopback. A spot preemption is a SIGTERM; the restarted worker runs the
identical command on a fresh disk and must end with the same trainable weights as a job that was
never interrupted. A second job started from the first job's artifact continues from it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from google.cloud import aiplatform_v1
from safetensors.torch import load_file

from dylora_moe import cli
from dylora_moe.errors import EXIT_PREEMPTED
from dylora_moe.model.io import WEIGHTS_NAME
from tests.cloud.gcs_emulator import emulator_fs, gcs_emulator
from tests.conftest import REPO_ROOT

HF_SECRET = "projects/proj/secrets/hf/versions/1"
HF_VALUE = "hf_value_never_printed_7d1e"
STEPS = 24  # enough steps after the first checkpoint that SIGTERM lands mid-training even on a busy machine


def job_command(capsys, small_model_dir: str, *extra: str) -> list[str]:
    """The container command of a job submitted (dry run) with ``extra`` training options."""
    status = cli.main(["submit", "vertex", "--project", "proj", "--region", "us-central1", "--image", "img:1",
                       "--base_output_dir", "gs://bkt/exp", "--spot", "--secret", f"HF_TOKEN={HF_SECRET}",
                       "--dry-run", "--", "--model_name", small_model_dir, "--report_to", "none",
                       "--training_subset", "8", "--max_seq_length", "128", "--train_batch_size", "4",
                       "--eval_steps", "0", "--logging_steps", "1", "--save_steps", "1", *extra])
    out = capsys.readouterr().out
    assert status == 0
    container = aiplatform_v1.CustomJob.from_json(out).job_spec.worker_pool_specs[0].container_spec
    command = list(container.command) + list(container.args)
    assert command[:3] == ["python", "-m", "dylora_moe.job.entrypoint"]
    return [sys.executable, *command[1:]]


class Job:
    """One Vertex job id; each ``start`` is a replica on a fresh VM (an empty working directory)."""

    def __init__(self, job_id: str, command: list[str], google, gcs: str, tmp_path):
        self.job_id, self.command, self.tmp_path, self.starts = job_id, command, tmp_path, 0
        self.env = {**google.env, "CLOUD_ML_JOB_ID": job_id, "STORAGE_EMULATOR_HOST": gcs,
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "PYTHONUNBUFFERED": "1",
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "AIP_MODEL_DIR": "gs://bkt/exp/model/", "AIP_CHECKPOINT_DIR": "gs://bkt/exp/checkpoints/",
                    "AIP_TENSORBOARD_LOG_DIR": "gs://bkt/exp/logs/",
                    "CLUSTER_SPEC": '{"cluster": {"workerpool0": ["cmle-training-workerpool0-0:2222"]}, '
                                    '"task": {"type": "workerpool0", "index": 0}}'}

    def start(self) -> subprocess.Popen:
        self.starts += 1
        self.disk = self.tmp_path / f"job{self.job_id}-vm{self.starts}"
        self.disk.mkdir()
        return subprocess.Popen(self.command, cwd=self.disk, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def run(self) -> str:
        proc = self.start()
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        return out

    def final_weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.disk / "runs" / self.job_id / "final" / WEIGHTS_NAME))


@pytest.mark.slow
def test_preempted_job_restarts_to_the_same_weights_and_a_second_job_continues(
        google, small_model_dir, tmp_path, capsys):
    google.secrets = {HF_SECRET: HF_VALUE}
    command = job_command(capsys, small_model_dir, "--max_steps", str(STEPS))
    with gcs_emulator("bkt") as gcs:
        fs = emulator_fs()

        # A job that is never interrupted: the reference.
        steady = Job("1001", command, google, gcs, tmp_path)
        steady.run()

        # A spot job: SIGTERM once it has trained (its first checkpoint exists), then Vertex restarts
        # the worker with the identical command on a fresh VM.
        spot = Job("2002", command, google, gcs, tmp_path)
        proc = spot.start()
        first = spot.disk / "runs" / "2002" / "checkpoints" / "step-00000001"
        deadline = time.monotonic() + 300
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_PREEMPTED, out
        assert "stopped by SIGTERM at step" in out and "Traceback" not in out
        assert "secrets resolved from Secret Manager into HF_TOKEN" in out and HF_VALUE not in out
        store = "gs://bkt/exp/2002/store"
        preempted_at = max(_steps(fs, store))
        assert 1 <= preempted_at < STEPS

        restarted = spot.run()
        assert f"resuming from {store}:v" in restarted and f"at step {preempted_at}" in restarted
        assert HF_VALUE not in restarted
        expected, got = steady.final_weights(), spot.final_weights()
        assert expected.keys() == got.keys() and len(expected) > 0
        assert all(torch.equal(expected[k], got[k]) for k in expected)
        # The trained mixture also landed in AIP_MODEL_DIR, where a user looks for it.
        final = spot.disk / "runs" / "2002" / "final"
        assert fs.cat_file(f"bkt/exp/model/{WEIGHTS_NAME}") == (final / WEIGHTS_NAME).read_bytes()

        # A second job starts from the first job's artifact and continues from its last step.
        follow_up = job_command(capsys, small_model_dir, "--max_steps", str(STEPS + 2),
                                "--resume", f"{store}:latest")
        assert follow_up[follow_up.index("--start_from") + 1] == f"{store}:latest"
        second = Job("3003", follow_up, google, gcs, tmp_path)
        out = second.run()
        assert "has no checkpoint of its own" in out and f"at step {STEPS}" in out
        assert max(_steps(fs, "gs://bkt/exp/3003/store")) == STEPS + 2


def test_the_tests_gcs_client_is_the_json_api_one_even_when_gcsfs_was_imported_first():
    """A session that imports gcsfs before tests/cloud/gcs_emulator.py (``importorskip("gcsfs")`` in a
    module collected earlier) gets gcsfs's experimental class as ``gcsfs.GCSFileSystem``; against the
    emulator its gRPC bucket-type probe waits up to 60 s on every call. Our client must not be that class."""
    env = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    code = ("import gcsfs, gcsfs.core\n"
            "from tests.cloud.gcs_emulator import emulator_fs\n"
            "print(gcsfs.GCSFileSystem.__name__, type(emulator_fs()) is gcsfs.core.GCSFileSystem)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ExtendedGcsFileSystem", "True"]


def _steps(fs, store: str) -> list[int]:
    """The global steps of the store's complete versions, read straight from the bucket."""
    root = store.removeprefix("gs://")
    manifests = [f"{p}/manifest.json" for p in fs.ls(root, detail=False, refresh=True)
                 if p.rsplit("/", 1)[-1].startswith("v")]
    return [json.loads(fs.cat_file(m))["global_step"] for m in manifests if fs.exists(m)]
