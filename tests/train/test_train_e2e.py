"""End to end: `dylora train` on the shipped model, on the built-in set and on real datasets."""

import json
import os

import pytest

from dylora_moe.cli import main
from dylora_moe.model.base import DEFAULT_MODEL_NAME
from tests.conftest import SHARED_DATASETS

MODEL = os.environ.get("DYLORA_TEST_MODEL", DEFAULT_MODEL_NAME)
FAST = ["--model_name", MODEL, "--report_to", "none", "--progress", "false", "--logging_steps", "2",
        "--save_steps", "0", "--max_seq_length", "256", "--train_batch_size", "8"]  # the tuned learning rate and alpha


def run_train(tmp_path, *argv):
    code = main(["train", "--output_dir", str(tmp_path), "--run_id", "e2e", *FAST, *argv])
    assert code == 0
    return json.loads((tmp_path / "e2e" / "summary.json").read_text())


@pytest.mark.slow
def test_trains_on_builtin_stdlib_functions_and_loss_falls(tmp_path, capsys):
    summary = run_train(tmp_path, "--max_steps", "16", "--eval_steps", "8", "--training_subset", "40",
                        "--maturity_fraction", "0.5")
    assert summary["eval_loss_final"] < summary["eval_loss_base"] - 0.05, summary
    assert summary["padding_waste"] < 0.10
    assert summary["maturity_step"] == 8  # half of the planned steps: dense, then top-1
    run_dir = tmp_path / "e2e"
    assert (run_dir / "routing.png").stat().st_size > 1000
    assert (run_dir / "summary.txt").read_text().startswith("run e2e: 16 optimizer steps")
    check_generate(run_dir / "final", capsys)


def check_generate(model_dir, capsys):
    """`dylora generate` prints the trained mixture's greedy continuation, the same on every call;
    with EOS suppressed the mixture continues for the full length, and up to the point where the
    CLI's output ended (at EOS) it is the same continuation."""
    import torch

    from dylora_moe.data import format_prompt
    from dylora_moe.model import DyLoRAMoE
    from dylora_moe.model.base import load_tokenizer

    instruction = "Return the sum of two numbers."
    printed = []
    for _ in range(2):
        capsys.readouterr()
        assert main(["generate", "--model", str(model_dir), "--max_new_tokens", "16", instruction]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]  # greedy decoding is deterministic

    model = DyLoRAMoE.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(str(model_dir))
    inputs = tokenizer(format_prompt(instruction), return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    common = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=16, **common)[0, n:]
        forced = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, **common)[0, n:]
    assert printed[0] == tokenizer.decode(greedy, skip_special_tokens=True) + "\n"
    assert printed[0].strip()
    assert forced.numel() == 16 and tokenizer.eos_token_id not in forced.tolist()
    ended = greedy.tolist().index(tokenizer.eos_token_id) if tokenizer.eos_token_id in greedy.tolist() else 16
    assert torch.equal(forced[:ended], greedy[:ended])


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
    report = json.loads((tmp_path / "e2e" / "routing_report.json").read_text())  # several datasets: routing report
    assert report["datasets"] == ["code_alpaca", "mbpp"] and report["granularity"] == "example"
    assert summary["routing_mutual_information_bits"] == report["mutual_information_bits"]["mean"]
    assert (tmp_path / "e2e" / "routing_heatmap.png").stat().st_size > 1000


def test_unknown_dataset_name_exits_2_listing_known_names(tmp_path, capsys):
    code = main(["train", "--output_dir", str(tmp_path), *FAST, "--datasets", "code_alpacca"])
    err = capsys.readouterr().err
    assert code == 2 and "code_alpacca" in err and "code_alpaca" in err and "mbpp" in err
