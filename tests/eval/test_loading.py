"""--model REF resolves like --resume: mixtures, checkpoint references (verified), base models."""

import shutil

import pytest

from dylora_moe.checkpoint.commit import write_checkpoint
from dylora_moe.checkpoint.format import checkpoint_name
from dylora_moe.errors import CheckpointError
from dylora_moe.eval.loading import resolve_model


@pytest.fixture(scope="module")
def run(mixture_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    for step in (5, 10):
        write_checkpoint(run / "checkpoints", checkpoint_name(step),
                         lambda d: [shutil.copy(p, d / p.name) for p in mixture_dir.iterdir()
                                    if p.name.startswith("dylora_")],
                         {"global_step": step})
    return run


def test_a_saved_mixture_directory_is_used_in_place(mixture_dir, tmp_path):
    source = resolve_model(str(mixture_dir), tmp_path)
    assert (source.mixture_dir, source.base_name) == (mixture_dir, "tiny-python-lm")


@pytest.mark.parametrize("form", ["run_dir", "latest", "checkpoint", "file_url"])
def test_checkpoint_references_resolve_to_the_verified_checkpoint(form, run, tmp_path):
    newest = run / "checkpoints" / checkpoint_name(10)
    ref = {"run_dir": str(run), "latest": "latest", "checkpoint": str(newest), "file_url": newest.as_uri()}[form]
    source = resolve_model(ref, tmp_path, run_dir=str(run) if form == "latest" else None)
    assert source.is_mixture and source.base_name == "tiny-python-lm"
    weights = "dylora_model.safetensors"
    assert (source.mixture_dir / weights).read_bytes() == (newest / weights).read_bytes()
    if form == "file_url":
        assert tmp_path in source.mixture_dir.parents  # downloaded, then verified


def test_a_base_model_name_stays_a_base_model(tmp_path):
    source = resolve_model("tiny-python-lm", tmp_path)
    assert not source.is_mixture and source.base_name == "tiny-python-lm"


def test_a_checkpoint_that_does_not_exist_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        resolve_model((tmp_path / "nowhere").as_uri(), tmp_path)
