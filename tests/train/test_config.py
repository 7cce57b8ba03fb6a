import argparse

import pytest

from dylora_moe.cli import build_parser, main
from dylora_moe.errors import ConfigError
from dylora_moe.train.config import TrainConfig, config_from_args

SEED_FLAGS = [
    "--num_epochs", "2", "--bf16", "--num_experts", "3", "--lora_r", "8", "--lora_alpha", "16",
    "--lora_dropout", "0.1", "--balance_coefficient", "0.02", "--datasets", "code_alpaca,mbpp",
    "--interleaved_sampling", "--cosine_restarts", "2", "--train_batch_size", "4", "--eval_batch_size", "8",
    "--gradient_accumulation_steps", "2", "--early_stopping_patience", "5", "--disable_early_stopping",
    "--training_subset", "50", "--eval_subset", "20", "--model_name", "some/model",
    "--wandb_checkpoint_artifact", "e/p/a:v3",
]


def parse(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_seed_flag_is_accepted():
    cfg = parse(SEED_FLAGS)
    assert (cfg.num_epochs, cfg.bf16, cfg.num_experts, cfg.lora_r, cfg.lora_alpha) == (2.0, True, 3, 8, 16.0)
    assert cfg.interleaved_sampling and cfg.disable_early_stopping and cfg.cosine_restarts == 2
    assert cfg.datasets == "code_alpaca,mbpp" and cfg.training_subset == 50 and cfg.eval_subset == 20
    assert cfg.wandb_checkpoint_artifact == "e/p/a:v3" and cfg.model_name == "some/model"
    assert cfg.resume_reference == ("e/p/a:v3", True)
    assert parse(["--resume_from_checkpoint", "runs/x"]).resume_reference == ("runs/x", False)


def test_two_different_resume_references_conflict():
    with pytest.raises(ConfigError, match="conflicting resume references"):
        parse(["--resume", "auto", "--wandb_checkpoint_artifact", "e/p/a:v3"])


def test_no_arguments_gives_the_embedded_default():
    cfg = parse([])
    assert cfg == TrainConfig()
    assert cfg.model_name == "tiny-python-lm" and cfg.datasets == "stdlib_functions"


def test_yaml_values_apply_and_flags_override_them(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora_r: 4\nlearning_rate: 3e-4\nbf16: true\ndatasets: [code_alpaca, mbpp]\nnum_epochs: 3\n")
    cfg = parse(["--config", str(path), "--lora_r", "32"])
    assert cfg.lora_r == 32  # the flag wins
    assert cfg.learning_rate == 3e-4 and cfg.bf16 is True and cfg.num_epochs == 3.0
    assert cfg.datasets == "code_alpaca,mbpp"


def test_yaml_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora_rank: 4\n")
    with pytest.raises(ConfigError, match="unknown option\\(s\\) lora_rank"):
        parse(["--config", str(path)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--training_subset", "0"], "--training_subset 0.0 is invalid: give a percentage from 1 to 100"),
        (["--eval_subset", "101"], "--eval_subset 101.0 is invalid"),
        (["--num_experts", "0"], "--num_experts 0 is invalid"),
        (["--fp16", "--bf16"], "choose one precision"),
        (["--report_to", "mlflow"], "choose auto, wandb, tensorboard or none"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_paragraph(argv, message, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_top_k_above_num_experts_is_refused(capsys, tmp_path):
    assert main(["train", "--num_experts", "2", "--top_k", "3", "--output_dir", str(tmp_path)]) == 2
    assert "top_k=3 is invalid with num_experts=2" in capsys.readouterr().err


def test_yaml_vertex_section_is_left_to_submit(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("lora_r: 8\nvertex:\n  project: p\n  region: us-central1\n")
    config = config_from_args(argparse.Namespace(config=str(path)))
    assert config.lora_r == 8
