import argparse

import pytest

from dylora_moe.cli import build_parser, main
from dylora_moe.errors import ConfigError
from dylora_moe.model.config import DyLoRAConfig
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


def test_the_mixture_options_take_the_mixtures_defaults_and_build_it():
    assert TrainConfig().model_config() == DyLoRAConfig()  # one owner of every default
    cfg = TrainConfig(num_experts=6, shared_experts=1, lora_r=4, lora_alpha=10.0, lora_dropout=0.0,
                      target_modules="q_proj,v_proj", top_k=2, router_temperature=1.5, routing="token",
                      router_scale=10.0, balance_coefficient=0.02, router_mi_coefficient=0.1,
                      dataset_mi_coefficient=0.0, gate_floor=0.1, z_loss_coefficient=0.001)
    assert cfg.model_config() == DyLoRAConfig(
        num_experts=6, shared_experts=1, r=4, alpha=10.0, dropout=0.0, target_modules=("q_proj", "v_proj"), top_k=2,
        router_temperature=1.5, routing="token", router_scale=10.0, balance_coefficient=0.02,
        router_mi_coefficient=0.1, dataset_mi_coefficient=0.0, gate_floor=0.1, z_loss_coefficient=0.001)
    assert TrainConfig(num_experts=2, lora_r=8).model_config().alpha == 512.0  # unset alpha: derived, 32 x 2 x 8


@pytest.mark.parametrize("values, message", [
    (dict(num_experts=0), "--num_experts 0 is invalid: it must be an integer >= 1."),
    (dict(lora_r=0), "--lora_r 0 is invalid: it must be an integer >= 1."),
    (dict(lora_dropout=1.0), "--lora_dropout 1.0 is invalid: it must be in [0, 1)."),
    (dict(routing="sentence"), "--routing 'sentence' is invalid: choose 'token'"),
])
def test_the_mixtures_check_names_the_flag(values, message):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**values)
    assert str(error.value).startswith(message)


CUSTOMISED = dict(
    model_name="some/model", num_experts=6, shared_experts=1, lora_r=8, lora_alpha=16.0, lora_dropout=0.1,
    target_modules="q_proj,v_proj", top_k=2, router_temperature=1.5, routing="token", router_scale=12.5,
    balance_coefficient=0.02, router_mi_coefficient=0.1, dataset_mi_coefficient=0.0, gate_floor=0.25,
    z_loss_coefficient=0.001, maturity_fraction=0.5, datasets="code_alpaca:2,mbpp:1", data_dir="/data",
    interleaved_sampling=True, max_seq_length=256, validation_fraction=0.1, training_subset=50.0, eval_subset=20.0,
    num_epochs=2.5, max_steps=1000, learning_rate=2e-4, weight_decay=0.01, warmup_ratio=0.1, cosine_restarts=2,
    max_grad_norm=0.5, train_batch_size=4, eval_batch_size=8, gradient_accumulation_steps=2, bf16=True, seed=7,
    eval_steps=25, early_stopping_patience=5, disable_early_stopping=True, eval_benchmarks="humaneval,mbpp",
    eval_every=100, eval_max_tasks=5, output_dir="out", run_id="exp-1", logging_steps=5, save_steps=50,
    report_to="none", wandb_project="proj", wandb_entity="team", resume="auto",
    start_from="gs://bucket/runs/old/store:latest", allow_fresh_start=True, grow_experts=True, save_total_limit=2,
    checkpoint_store="s3://bucket/store", store_timeout_s=30.0, publish_timeout_s=60.0, preemption_budget_s=20.0,
    progress=False)


@pytest.mark.parametrize("config", [TrainConfig(), TrainConfig(**CUSTOMISED)], ids=["default", "customised"])
def test_to_argv_gives_the_configuration_back(config, monkeypatch):
    monkeypatch.delenv("DYLORA_DATA_DIR", raising=False)
    assert parse(config.to_argv()) == config


def test_to_argv_names_only_what_differs_or_what_was_asked_for():
    assert TrainConfig().to_argv() == []
    cfg = TrainConfig(num_experts=2, bf16=True, progress=False)
    assert cfg.to_argv() == ["--num_experts", "2", "--bf16", "true", "--progress", "false"]
    assert cfg.to_argv({"lora_r", "bf16", "run_id"}) == ["--lora_r", "16", "--bf16", "true"]  # unset: left out


def test_top_k_without_maturity_warns_that_routing_stays_dense(caplog):
    from dylora_moe.cli import build_parser

    config_from_args(build_parser().parse_args(["train", "--num_experts", "6", "--top_k", "2"]))
    (warning,) = [r.getMessage() for r in caplog.records if "--top_k" in r.getMessage()]
    assert "--top_k 2 has no effect" in warning and "--maturity_fraction below 1" in warning
    caplog.clear()
    config_from_args(build_parser().parse_args(["train", "--num_experts", "6", "--top_k", "2",
                                                "--maturity_fraction", "0.5"]))
    assert not [r for r in caplog.records if "--top_k" in r.getMessage()]


def test_train_help_prints_each_default_once():
    import io
    from contextlib import redirect_stdout

    from dylora_moe.cli import build_parser

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(out.getvalue().split())
    assert "(default: RUN_DIR/store)" in text and "(default: RUN_DIR/store) (default: None)" not in text
    assert text.count("(default: 32 x (num_experts + shared_experts) x lora_r)") == 1


def test_a_high_learning_rate_with_the_default_alpha_warns_with_an_alpha_to_use(caplog):
    config_from_args(build_parser().parse_args(["train", "--learning_rate", "2e-3"]))
    (warning,) = [r.getMessage() for r in caplog.records if "--learning_rate" in r.getMessage()]
    assert "--learning_rate 0.002 with the default --lora_alpha" in warning and "e.g. --lora_alpha 512" in warning
    caplog.clear()
    config_from_args(build_parser().parse_args(["train", "--learning_rate", "2e-3", "--lora_alpha", "512"]))
    config_from_args(build_parser().parse_args(["train"]))
    assert not [r for r in caplog.records if "--learning_rate" in r.getMessage()]
