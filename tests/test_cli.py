"""The installed ``dylora`` console script as a user runs it: top level, and the errors a first
run meets (each one paragraph on stderr, its exit status, no traceback, nothing trained)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "data" / "fixtures"


def dylora_script() -> Path:
    """The console script pip installed beside this interpreter (``.venv/bin/dylora``)."""
    script = Path(sys.executable).parent / ("dylora.exe" if os.name == "nt" else "dylora")
    assert script.is_file(), f"{script} is missing: install the package (make install)"
    return script


def dylora(*args: str, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([str(dylora_script()), *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=300)


def assert_one_paragraph_error(done: subprocess.CompletedProcess, status: int, command: str, *phrases: str) -> None:
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"dylora {command}: error: ")]
    assert len(errors) == 1, done.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def test_version_names_the_installed_distribution():
    done = dylora("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"dylora-moe {importlib.metadata.version('dylora-moe')}"


def test_no_command_prints_the_commands_and_exits_2():
    done = dylora()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stdout.startswith("usage: dylora")
    for command in ("train", "generate", "ckpt"):
        assert f"    {command}" in done.stdout, done.stdout
    assert "exit status: 0 success" in done.stdout


@pytest.mark.slow  # imports torch and the trainer
def test_fp16_without_a_gpu_is_refused(tmp_path):
    done = dylora("train", "--fp16", "--output_dir", str(tmp_path), "--run_id", "fp16", cwd=tmp_path)
    assert_one_paragraph_error(done, 2, "train", "--fp16 needs a CUDA GPU", "--bf16")
    assert not (tmp_path / "fp16" / "checkpoints").exists()


@pytest.mark.slow  # imports torch and the trainer
def test_wandb_checkpoint_store_without_wandb_metrics_is_refused(tmp_path):
    done = dylora("train", "--checkpoint_store", "wandb", "--report_to", "none", "--output_dir", str(tmp_path),
                  "--run_id", "store", cwd=tmp_path)
    assert_one_paragraph_error(done, 2, "train", "--checkpoint_store wandb needs W&B metrics", "--report_to wandb")
    assert not (tmp_path / "store" / "checkpoints").exists()


@pytest.mark.slow
def test_an_empty_validation_split_is_refused(tmp_path):
    done = dylora("train", "--datasets", str(FIXTURES / "prompt_completion.jsonl"), "--validation_fraction", "0",
                  "--output_dir", str(tmp_path), "--run_id", "noval", "--report_to", "none", "--progress", "false",
                  cwd=tmp_path)
    assert_one_paragraph_error(done, 2, "train", "the validation split is empty", "--validation_fraction",
                               "--eval_subset")
    assert not (tmp_path / "noval" / "checkpoints").exists()


@pytest.mark.slow
def test_a_base_model_that_cannot_be_loaded_is_named(tmp_path):
    """A directory with the shipped tokenizer but no model in it."""
    import shutil

    from dylora_moe.model.base import DEFAULT_MODEL_NAME, resolve_model_path

    broken = tmp_path / "tokenizer-only"
    broken.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(resolve_model_path(DEFAULT_MODEL_NAME)) / name, broken / name)
    done = dylora("train", "--model_name", str(broken), "--output_dir", str(tmp_path), "--run_id", "nobase",
                  "--report_to", "none", "--progress", "false", cwd=tmp_path)
    assert_one_paragraph_error(done, 2, "train", f"cannot load base model {str(broken)!r}", "hub id",
                               "'tiny-python-lm' for the shipped model")
    assert not (tmp_path / "nobase" / "checkpoints").exists()
