"""One table of checkpoint references through every command that takes one.

Each reference goes through the functions that ``dylora train --resume``, ``dylora ckpt
show|verify``, ``dylora eval --model``, ``dylora generate --model`` / ``dylora report routing
--model`` and ``dylora submit vertex -- --resume`` call, and every one of them must reach the same
checkpoint, or fail with the very same message. The stores are real: a local store directory,
``file://``, S3 (a moto server on loopback) and GCS (the emulator); W&B answers through a fake API
that knows no artifact, so the W&B rows end in the same "cannot be found" message everywhere.
"""

from __future__ import annotations

import argparse
import json
import re
import uuid
from pathlib import Path

import pytest

from dylora_moe.checkpoint import inspect
from dylora_moe.checkpoint.commit import write_checkpoint
from dylora_moe.checkpoint.format import checkpoint_name, read_manifest
from dylora_moe.checkpoint.references import MalformedReference, Reference, fetch_model, parse_reference
from dylora_moe.checkpoint.resume import resolve_resume
from dylora_moe.checkpoint.stores import LocalStore, open_store
from dylora_moe.checkpoint.stores.wandb_store import WandbStore
from dylora_moe.cli import build_parser
from dylora_moe.cloud.command import _start_from, _train_config
from dylora_moe.errors import ConfigError, DyLoRAError
from dylora_moe.eval.loading import resolve_model
from dylora_moe.train.config import config_from_args
from tests.checkpoint.conftest import payload

RUN = "runs/exp1"  # relative to the test's working directory: looks like the seed's bare E/P/NAME

# (reference, its parse (kind, location, alias), the step every command reaches, or the error it gives)
FOUND = [
    ("{run}/checkpoints/step-00000010", ("path", "{run}/checkpoints/step-00000010", None), 10),
    ("{run}", ("path", "{run}", None), 20),
    ("{run}/store:latest", ("store", "{run}/store", "latest"), 20),
    ("{run}/store:v0", ("store", "{run}/store", "v0"), 10),
    ("{tmp}/{run}/store:best", ("store", "{tmp}/{run}/store", "best"), 10),
    ("file://{tmp}/{run}/store:v1", ("url", "file://{tmp}/{run}/store", "v1"), 20),
    ("file://{tmp}/{run}/store/v0", ("url", "file://{tmp}/{run}/store/v0", None), 10),
    ("s3://ckpt/{prefix}/store:latest", ("url", "s3://ckpt/{prefix}/store", "latest"), 20),
    ("s3://ckpt/{prefix}/store/v0", ("url", "s3://ckpt/{prefix}/store/v0", None), 10),
    ("gs://ckpt/{prefix}/store:best", ("url", "gs://ckpt/{prefix}/store", "best"), 10),
]
WANDB_MISSING = "W&B artifact {artifact} cannot be found (KeyError: '{artifact} is not in this fake'); " \
                "available versions of wandb://{name}: none."
NOT_FOUND = [
    ("wandb://team/proj/run1-checkpoint:best", ("wandb", "wandb://team/proj/run1-checkpoint", "best"),
     "Cannot fetch checkpoint '{ref}': " + WANDB_MISSING.format(artifact="team/proj/run1-checkpoint:best",
                                                                 name="team/proj/run1-checkpoint")),
    ("wandb://team/proj/run1-checkpoint", ("wandb", "wandb://team/proj/run1-checkpoint", "latest"),
     "Cannot fetch checkpoint '{ref}': " + WANDB_MISSING.format(artifact="team/proj/run1-checkpoint:latest",
                                                                 name="team/proj/run1-checkpoint")),
    ("team/proj/run1-checkpoint:v3", ("wandb", "wandb://team/proj/run1-checkpoint", "v3"),
     "Cannot fetch checkpoint '{ref}': " + WANDB_MISSING.format(artifact="team/proj/run1-checkpoint:v3",
                                                                 name="team/proj/run1-checkpoint")
     + " ('{ref}' was read as the W&B artifact wandb://team/proj/run1-checkpoint:v3: no local directory "
       "team/proj/run1-checkpoint exists)"),
    ("runs/nowhere/store:latest", ("wandb", "wandb://runs/nowhere/store", "latest"),  # no such local store: W&B
     "Cannot fetch checkpoint '{ref}': " + WANDB_MISSING.format(artifact="runs/nowhere/store:latest",
                                                                 name="runs/nowhere/store")
     + " ('{ref}' was read as the W&B artifact wandb://runs/nowhere/store:latest: no local directory "
       "runs/nowhere/store exists)"),
    ("{tmp}/runs/nowhere/store:latest", ("store", "{tmp}/runs/nowhere/store", "latest"),
     "Cannot fetch checkpoint '{ref}': the local store directory {tmp}/runs/nowhere/store does not exist."),
    ("{run}/store:v9", ("store", "{run}/store", "v9"),
     "Cannot fetch checkpoint '{ref}': Store file://{tmp}/{run}/store: 'v9' is not a complete version or alias; "
     "available versions: ['v0', 'v1']"),
]
MALFORMED = [
    ("s3://", "the URL has no bucket or path"),
    ("wandb://e/p", "a W&B reference names ENTITY/PROJECT/NAME (three parts)"),
    ("wandb://e/p/n:", "'' is not a version (v3) or alias"),
    ("x:", "'' is not a version (v3) or alias"),
    (":latest", "nothing before ':latest' names a store"),
    ("{run}/store:", "'' is not a version (v3) or alias"),
    ("{run}/store:no way", "'no way' is not a version (v3) or alias"),
    ("ftp://host/ckpt:latest", "the scheme ftp:// is not supported"),
]


class MissingArtifacts:
    """A W&B API that knows no artifact (``WandbStore._api`` returns it)."""

    def artifact(self, name: str, type: str):
        raise KeyError(f"{name} is not in this fake")

    def artifact_collection_exists(self, name: str, type: str) -> bool:
        return False


def write(parent: Path, step: int) -> Path:
    files = {**payload(step), "dylora_config.json": json.dumps({"base_model_name_or_path": "tiny-python-lm"}).encode()}

    def fill(staging: Path) -> None:
        for rel, data in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)

    return write_checkpoint(parent, checkpoint_name(step), fill, {"global_step": step, "epoch": 0})


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_endpoint):
    """A run directory with checkpoints 10 and 20, published as v0 (best) and v1 (latest) to its local
    store, to S3 and to GCS under one prefix."""
    from tests.cloud.gcs_emulator import gcs_emulator

    tmp = tmp_path_factory.mktemp("refs")
    sources = {step: write(tmp / RUN / "checkpoints", step) for step in (10, 20)}
    prefix = uuid.uuid4().hex
    with gcs_emulator("ckpt"):
        _forget_gcs_clients()  # an earlier module's emulator (another port) may be cached
        for store in (LocalStore(tmp / RUN / "store"),
                      open_store(f"s3://ckpt/{prefix}/store",
                                 storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}}),
                      open_store(f"gs://ckpt/{prefix}/store")):
            assert store.publish(sources[10], 10, ["latest", "best"]) == "v0"
            assert store.publish(sources[20], 20, ["latest"]) == "v1"
        yield {"tmp": str(tmp), "run": RUN, "prefix": prefix, "s3": s3_endpoint}
        _forget_gcs_clients()


def _forget_gcs_clients() -> None:
    from gcsfs.core import GCSFileSystem

    GCSFileSystem.clear_instance_cache()


@pytest.fixture
def here(world, tmp_path, monkeypatch):
    """In the directory that holds ``runs/``; S3 at the moto server; W&B knows nothing."""
    monkeypatch.chdir(world["tmp"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", world["s3"])
    monkeypatch.setattr(WandbStore, "_api", lambda self: MissingArtifacts())
    return {**world, "work": tmp_path}


# --------------------------------------------------------------------------- the entry points
def train_resume(ref: str, work: Path) -> Path:
    """``dylora train --resume REF``: the config's validation, then the trainer's fetch."""
    cfg = config_from_args(build_parser().parse_args(["train", "--resume", ref, "--output_dir", str(work / "out")]))
    reference, bare_is_wandb = cfg.resume_reference
    return resolve_resume(reference, work / "out" / "run", None, bare_is_wandb=bare_is_wandb)


def ckpt_show(ref: str, work: Path) -> int:
    return int(re.search(r"^  step (\d+), epoch", inspect.show(ref), re.M).group(1))


def ckpt_verify(ref: str, work: Path) -> int:
    return int(re.search(r"^ok: .* \(step (\d+), ", inspect.verify(ref)).group(1))


def eval_model(ref: str, work: Path) -> Path:
    source = resolve_model(ref, work / "eval")
    assert source.is_mixture and source.base_name == "tiny-python-lm"
    return source.mixture_dir


def generate_or_report_model(ref: str, work: Path) -> Path:
    """``dylora generate --model REF`` and ``dylora report routing --model REF`` fetch with this."""
    return fetch_model(ref, work / "model")


def submit_start(ref: str) -> str | None:
    """The ``--start_from`` of the job that ``dylora submit vertex -- --resume REF`` creates."""
    cfg, _, _ = _train_config(argparse.Namespace(config=None), ["--resume", ref])
    return _start_from(cfg)


FETCHERS = [train_resume, ckpt_show, ckpt_verify, eval_model, generate_or_report_model]


def step_of(result) -> int:
    return result if isinstance(result, int) else read_manifest(result).global_step


def fill(template: str, w: dict) -> str:
    return template.format(tmp=w["tmp"], run=w["run"], prefix=w["prefix"])


# --------------------------------------------------------------------------- the table
@pytest.mark.parametrize("template, parsed, step", FOUND, ids=[row[0] for row in FOUND])
def test_every_command_reaches_the_same_checkpoint(here, template, parsed, step):
    ref = fill(template, here)
    expected = tuple(fill(p, here) if p else p for p in parsed)
    got = parse_reference(ref)
    assert (got.kind, got.location, got.alias) == expected
    for i, entry in enumerate(FETCHERS):
        assert step_of(entry(ref, here["work"] / str(i))) == step, entry.__name__
    start = _job_start(ref)
    if start is not None:  # a store the job can reach: it starts from the same checkpoint
        assert parse_reference(start) == Reference(start, *expected)
        first = resolve_resume("auto", here["work"] / "job" / "run", None, start_from=start)
        assert step_of(first) == step


def _job_start(ref: str) -> str | None:
    parsed = parse_reference(ref)
    if parsed.is_local:
        with pytest.raises(ConfigError, match=re.escape(f"--resume {ref!r} is a local path, which the job's "
                                                        "container does not have")):
            submit_start(ref)
        return None
    return submit_start(ref)


@pytest.mark.parametrize("template, parsed, message", NOT_FOUND, ids=[row[0] for row in NOT_FOUND])
def test_every_command_fails_with_the_same_message(here, template, parsed, message):
    ref = fill(template, here)
    expected = tuple(fill(p, here) if p else p for p in parsed)
    got = parse_reference(ref)
    assert (got.kind, got.location, got.alias) == expected
    want = fill(message.replace("{ref}", "{{ref}}"), here).format(ref=ref)
    for i, entry in enumerate(FETCHERS):
        with pytest.raises(DyLoRAError) as err:
            entry(ref, here["work"] / str(i))
        assert str(err.value).startswith(want), (entry.__name__, str(err.value))
        assert err.value.exit_code == 1
    if got.kind == "wandb":  # the job names the artifact explicitly
        assert submit_start(ref) == f"{got.location}:{got.alias}"


@pytest.mark.parametrize("template, why", MALFORMED, ids=[row[0] for row in MALFORMED])
def test_a_malformed_reference_is_the_same_bad_input_everywhere(here, template, why):
    ref = fill(template, here)
    with pytest.raises(MalformedReference) as parsed:
        parse_reference(ref)
    message = str(parsed.value)
    assert message.startswith(f"Checkpoint reference {ref!r} is malformed: {why}")
    assert "accepted forms: auto, latest, a local directory" in message
    for entry in [*FETCHERS, lambda r, _: inspect.list_refs(r), lambda r, _: submit_start(r)]:
        with pytest.raises(MalformedReference) as err:
            entry(ref, here["work"])
        assert str(err.value) == message and err.value.exit_code == 2


def test_wandb_checkpoint_artifact_takes_the_w_and_b_forms_only(here):
    """The seed's flag says W&B: a local directory of that name does not count, other forms are refused."""
    ref = f"{RUN}/store:latest"
    assert parse_reference(ref).kind == "store"
    assert parse_reference(ref, bare_is_wandb=True) == Reference(ref, "wandb", f"wandb://{RUN}/store", "latest")
    with pytest.raises(MalformedReference, match="--wandb_checkpoint_artifact expects ENTITY/PROJECT/NAME:vN"):
        config_from_args(build_parser().parse_args(["train", "--wandb_checkpoint_artifact", f"{RUN}/store"]))
