"""Every `dylora train|generate|ckpt` command shown in README.md, run as written.

Only what a CPU test cannot afford is added: training commands get a few flags that make them one
short step (appended, so everything the README wrote is still parsed and used), placeholders such
as RUN_ID are filled with a real run, and `s3://bucket/...` is served by a real S3-protocol server
(moto) on loopback. Named datasets come from ../shared/datasets through DYLORA_DATA_DIR, as the
README says an offline directory does.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, SHARED_DATASETS

SHORT = ["--max_steps", "1", "--max_seq_length", "64", "--training_subset", "2", "--eval_subset", "5",
         "--eval_steps", "0", "--progress", "false", "--report_to", "none"]


def readme_commands(*subcommands: str) -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if any(line.startswith(f"dylora {sub} ") for sub in subcommands):
                commands.append(line)
    return commands


def test_the_readme_shows_the_examples_this_file_runs():
    train = readme_commands("train")
    assert ('dylora train --datasets "code_alpaca:2,evol_instruct:1" --data_dir ../shared/datasets '
            '--num_experts 6 --top_k 2 --maturity_fraction 0.5') in train
    assert len(readme_commands("generate")) >= 1 and len(readme_commands("ckpt")) >= 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory where the README's relative paths hold: ../shared/datasets and runs/."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").mkdir()
    (root / "shared" / "datasets").symlink_to(SHARED_DATASETS)
    (root / "work").mkdir()
    return root / "work"


@pytest.fixture(scope="module")
def s3(workdir):
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, key="testing", secret="testing",
                      skip_instance_cache=True).mkdir("bucket")
    yield env
    server.stop()


def dylora(command: str, cwd, env_extra=None, timeout=600):
    argv = shlex.split(command)
    assert argv[0] == "dylora"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DYLORA_DATA_DIR": str(SHARED_DATASETS),
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "dylora_moe.cli", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(workdir, s3):
    for i, command in enumerate(readme_commands("train")):
        done = dylora(f"{command} {shlex.join(['--run_id', f'example{i}', *SHORT])}", workdir)
        assert done.returncode == 0, (command, done.stderr)
        assert "Traceback" not in done.stderr

    # A run with checkpoints in an S3 store, for the generate and ckpt examples' placeholders.
    run = dylora("dylora train " + shlex.join(["--run_id", "RUN_ID", *SHORT, "--max_steps", "4", "--save_steps", "1",
                                               "--checkpoint_store", "s3://bucket/run1/store"]), workdir, s3)
    assert run.returncode == 0, run.stderr
    # what `make demo` runs (shortened), for the examples that use its runs/demo
    demo = dylora("dylora train --run_id demo --resume auto " + shlex.join(SHORT), workdir)
    assert demo.returncode == 0, demo.stderr
    for command in readme_commands("generate", "ckpt"):
        if "runs/RUN_ID/store" in command:  # this run's store is the S3 one
            command = command.replace("runs/RUN_ID/store", "s3://bucket/run1/store")
        done = dylora(command, workdir, s3)
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.strip() and "Traceback" not in done.stderr
        if command.startswith("dylora ckpt verify"):
            assert "ok" in done.stdout
        if command.startswith("dylora ckpt list"):
            assert "step-00000004" in done.stdout
