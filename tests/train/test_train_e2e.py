"""End to end: `dylora train` on the shipped model, on the built-in set and on real datasets."""

import json
import os

import pytest

from dylora_moe.cli import main
from dylora_moe.model.base import DEFAULT_MODEL_NAME
from tests.conftest import SHARED_DATASETS

MODEL = os.environ.get("DYLORA_TEST_MODEL", DEFAULT_MODEL_NAME)
FAST = ["--model_name", MODEL, "--report_to", "none", "--progress", "false", "--logging_steps", "2",
        "--save_steps", "0", "--max_seq_length", "256", "--learning_rate", "2e-3", "--train_batch_size", "8"]


def run_train(tmp_path, *argv):
    code = main(["train", "--output_dir", str(tmp_path), "--run_id", "e2e", *FAST, *argv])
    assert code == 0
    return json.loads((tmp_path / "e2e" / "summary.json").read_text())


@pytest.mark.slow
def test_trains_on_builtin_stdlib_functions_and_loss_falls(tmp_path, capsys):
    summary = run_train(tmp_path, "--max_steps", "16", "--eval_steps", "8", "--training_subset", "40")
    assert summary["eval_loss_final"] < summary["eval_loss_base"] - 0.05, summary
    assert summary["padding_waste"] < 0.10
    assert summary["maturity_step"] == 8  # half of the planned steps: dense, then top-1
    run_dir = tmp_path / "e2e"
    assert (run_dir / "routing.png").stat().st_size > 1000
    assert (run_dir / "summary.txt").read_text().startswith("run e2e: 16 optimizer steps")
    capsys.readouterr()
    assert main(["generate", "--model", str(run_dir / "final"), "--max_new_tokens", "16",
                 "Return the sum of two numbers."]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_trains_on_code_alpaca_and_mbpp_interleaved(tmp_path):
    summary = run_train(
        tmp_path, "--datasets", "code_alpaca,mbpp", "--data_dir", str(SHARED_DATASETS), "--interleaved_sampling",
        "--max_steps", "12", "--eval_steps", "0", "--training_subset", "10", "--eval_subset", "30",
    )
    assert summary["eval_loss_final"] < summary["eval_loss_base"] - 0.05, summary
    counts = summary["data"]["datasets"]
    assert set(counts) == {"code_alpaca", "mbpp"}
    assert counts["code_alpaca"]["in_mix"] == counts["mbpp"]["in_mix"]  # balanced interleaving


def test_unknown_dataset_name_exits_2_listing_known_names(tmp_path, capsys):
    code = main(["train", "--output_dir", str(tmp_path), *FAST, "--datasets", "code_alpacca"])
    err = capsys.readouterr().err
    assert code == 2 and "code_alpacca" in err and "code_alpaca" in err and "mbpp" in err
