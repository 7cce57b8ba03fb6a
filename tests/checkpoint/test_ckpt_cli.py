"""``dylora ckpt list|show|verify`` on object stores: S3 (a moto server on loopback) as subprocesses,
and ``memory://``.

A ``memory://`` store lives inside one process (fsspec's in-memory filesystem), so a fresh
``dylora`` process finds nothing there: that is what the subprocess test asserts. Listing, showing
and verifying a populated ``memory://`` store is tested in-process through the CLI's ``main()``,
in the process that published to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from dylora_moe.checkpoint.stores import FsspecStore
from dylora_moe.cli import main
from tests.conftest import REPO_ROOT


def dylora(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dylora_moe.cli", *args], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)


def publish_two(store, ckpts) -> None:
    _, make = ckpts
    assert store.publish(make(10), 10, ["latest", "best"]) == "v0"
    assert store.publish(make(20), 20, ["latest"]) == "v1"


def corrupt(store, key: str) -> None:
    data = bytearray(store._read(key))
    data[-1] ^= 0xFF
    store.fs.pipe_file(store._path(key), bytes(data))


def rows(out: str) -> dict[str, list[str]]:
    """``ckpt list`` rows by version: the words of each line."""
    return {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith("v")}


def test_list_show_verify_an_s3_store_as_subprocesses(s3_endpoint, ckpts):
    url = f"s3://ckpt/{uuid.uuid4().hex}/store"
    store = FsspecStore(url, storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    publish_two(store, ckpts)
    env = {"AWS_ENDPOINT_URL": s3_endpoint}  # credentials: the fixture's AWS_* variables

    listed = dylora("ckpt", "list", url, env=env)
    assert listed.returncode == 0, listed.stderr
    versions = rows(listed.stdout)
    assert sorted(versions) == ["v0", "v1"]
    assert versions["v0"][1:3] == ["step", "10"] and "best," in versions["v0"]
    assert versions["v1"][1:3] == ["step", "20"] and "latest," in versions["v1"]

    shown = dylora("ckpt", "show", f"{url}:latest", env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"checkpoint {url}:latest" in shown.stdout and "step 20, epoch 0" in shown.stdout
    assert '"run_id": "run1"' in shown.stdout  # the W&B run recorded in the manifest

    verified = dylora("ckpt", "verify", f"{url}:step-10", env=env)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"ok: {url}:step-10 (step 10, 3 files")

    corrupt(store, "v1/trainable.safetensors")
    damaged = dylora("ckpt", "verify", f"{url}:latest", env=env)
    assert damaged.returncode == 1 and "Traceback" not in damaged.stderr
    assert damaged.stderr.startswith("dylora ckpt: error: ")  # one paragraph, no library chatter before it
    assert "trainable.safetensors" in damaged.stderr and url in damaged.stderr


def test_a_fresh_process_finds_nothing_in_a_memory_store():
    """memory:// is per process: `dylora ckpt list` in a new process says nothing was found."""
    ref = f"memory://ckpt-{uuid.uuid4().hex}/store"
    done = dylora("ckpt", "list", ref)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"dylora ckpt: error: no complete checkpoint found at {ref!r}." in done.stderr


def test_list_show_verify_a_memory_store_in_process(ckpts, capsys):
    url = f"memory://ckpt-{uuid.uuid4().hex}/store"
    publish_two(FsspecStore(url), ckpts)
    capsys.readouterr()
    assert main(["ckpt", "list", url]) == 0
    versions = rows(capsys.readouterr().out)
    assert versions["v0"][1:3] == ["step", "10"] and versions["v1"][1:3] == ["step", "20"]
    assert main(["ckpt", "show", f"{url}:best"]) == 0
    assert "step 10, epoch 0" in capsys.readouterr().out
    assert main(["ckpt", "verify", f"{url}:v1"]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {url}:v1 (step 20, 3 files")
    corrupt(FsspecStore(url), "v0/data_state.json")
    assert main(["ckpt", "verify", f"{url}:best"]) == 1
    assert "data_state.json" in capsys.readouterr().err


def test_list_with_nothing_found_is_an_error(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["ckpt", "list", str(tmp_path / "run")]) == 1
    assert f"no complete checkpoint found at {str(tmp_path / 'run')!r}" in capsys.readouterr().err
