"""Resuming onto another architecture: exit status 2 and a table naming the field, before training.

``r`` and ``num_experts`` are covered with the resume tests; these are the other fields a user
changes by mistake: ``--lora_alpha``, ``--top_k``, ``--router_temperature``, and a base model
with another configuration but weights of the same shapes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dylora_moe.cli import main
from dylora_moe.train.config import TrainConfig
from dylora_moe.train.trainer import Trainer
from tests.conftest import REPO_ROOT

TINY = ["--report_to", "none", "--progress", "false", "--training_subset", "2", "--max_seq_length", "64",
        "--max_steps", "1", "--eval_steps", "0"]


@pytest.fixture(scope="module")
def checkpoint(small_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fingerprint")
    Trainer(TrainConfig(model_name=small_model_dir, output_dir=str(out), run_id="a", report_to="none", progress=False,
                        training_subset=2, max_seq_length=64, max_steps=1, eval_steps=0)).setup().train()
    return out / "a" / "checkpoints" / "step-00000001"


def table_fields(err: str) -> list[str]:
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["field"])
    assert lines[start].split() == ["field", "checkpoint", "requested"]
    return [line.split()[0] for line in lines[start + 1:] if line.strip()]


def resume_argv(model, checkpoint, run_dir, run_id):
    return ["train", "--model_name", str(model), "--output_dir", str(run_dir), "--run_id", run_id,
            "--resume", str(checkpoint), *TINY]


@pytest.mark.slow
def test_another_lora_alpha_exits_2_naming_alpha(small_model_dir, checkpoint, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "dylora_moe.cli",
                           *resume_argv(small_model_dir, checkpoint, tmp_path, "alpha"), "--lora_alpha", "8"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "does not fit the requested model" in done.stderr and "Traceback" not in done.stderr
    assert table_fields(done.stderr) == ["alpha"]
    assert "2048.0" in done.stderr and "8.0" in done.stderr  # both values shown (the default alpha is 2048)
    assert not (tmp_path / "alpha" / "checkpoints").exists()  # nothing trained, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("flag, value, field", [
    ("--top_k", "2", "top_k"),
    ("--router_temperature", "0.5", "router_temperature"),
])
def test_other_router_settings_exit_2_naming_the_field(small_model_dir, checkpoint, tmp_path, capsys,
                                                        flag, value, field):
    capsys.readouterr()
    assert main([*resume_argv(small_model_dir, checkpoint, tmp_path, "r"), flag, value]) == 2
    assert table_fields(capsys.readouterr().err) == [field]
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
def test_a_base_with_another_config_but_the_same_shapes_exits_2(small_model_dir, checkpoint, tmp_path, capsys):
    other = tmp_path / "other-base"
    shutil.copytree(small_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 10  # same weights, other normalisation
    (other / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(resume_argv(other, checkpoint, tmp_path, "base")) == 2
    err = capsys.readouterr().err
    assert "base_config_sha" in table_fields(err) and "base_weight_shapes_sha" not in table_fields(err)
    assert not (tmp_path / "base" / "checkpoints").exists()


@pytest.fixture(scope="module")
def attention_checkpoint(small_model_dir, tmp_path_factory):
    """A checkpoint whose experts sit on q_proj,v_proj: the default before it became 'mlp'."""
    out = tmp_path_factory.mktemp("attention")
    Trainer(TrainConfig(model_name=small_model_dir, output_dir=str(out), run_id="qv", report_to="none", progress=False,
                        training_subset=2, max_seq_length=64, max_steps=1, eval_steps=0,
                        target_modules="q_proj,v_proj")).setup().train()
    return out / "qv" / "checkpoints" / "step-00000001"


def test_unset_target_modules_resume_on_the_checkpoints_layers_and_named_ones_must_match(
        small_model_dir, attention_checkpoint, tmp_path, capsys):
    resumed = Trainer(TrainConfig(model_name=small_model_dir, output_dir=str(tmp_path), run_id="kept",
                                  report_to="none", progress=False, training_subset=2, max_seq_length=64, max_steps=2,
                                  eval_steps=0, resume=str(attention_checkpoint))).setup()
    assert {n.rsplit(".", 1)[-1] for n in resumed.model.adapted_names} == {"q_proj", "v_proj"}
    resumed.train()
    assert resumed.state.global_step == 2
    capsys.readouterr()
    assert main([*resume_argv(small_model_dir, attention_checkpoint, tmp_path, "mlp"), "--target_modules", "mlp"]) == 2
    assert table_fields(capsys.readouterr().err) == ["target_modules"]
    assert not (tmp_path / "mlp" / "checkpoints").exists()
