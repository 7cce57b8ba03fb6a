"""``dylora generate`` as a user runs it: which models it takes, what it prints, and bad input."""

import os
import subprocess
import sys

import pytest
import torch

from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
from dylora_moe.model.base import load_tokenizer


def dylora(*args):
    return subprocess.run([sys.executable, "-m", "dylora_moe.cli", "generate", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ), timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory whose final/ holds a small mixture with non-zero experts."""
    torch.manual_seed(0)
    model = DyLoRAMoE("tiny-python-lm", DyLoRAConfig(num_experts=2, r=4))
    with torch.no_grad():
        for _, layer in model.adapted_layers():
            layer.lora_B.normal_(std=0.05)
    run = tmp_path_factory.mktemp("runs") / "r1"
    model.save_pretrained(run / "final")
    load_tokenizer("tiny-python-lm").save_pretrained(run / "final")
    return run


@pytest.mark.parametrize("args,message", [
    (["--max_new_tokens", "-1", "hi"], "--max_new_tokens -1 is invalid: give a number of tokens >= 1."),
    (["  "], "the prompt is empty: give the instruction to complete"),
    (["--temperature", "-0.5", "hi"], "--temperature -0.5 is invalid"),
    (["--top_p", "1.5", "--temperature", "0.7", "hi"], "--top_p 1.5 is invalid: give a probability mass in (0, 1]."),
])
def test_bad_values_are_refused_before_anything_loads(args, message, run_dir, capsys):
    from dylora_moe.cli import main

    status = main(["generate", "--model", str(run_dir / "final"), *args])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("dylora generate: error:") and message in err, err


def test_a_model_that_does_not_exist_is_named_by_the_option_the_user_gave(capsys):
    from dylora_moe.cli import main

    assert main(["generate", "--model", "/nonexistent/run", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--model '/nonexistent/run': no such directory" in err and "--model_name" not in err, err


@pytest.mark.slow  # subprocesses: seconds of start-up each
def test_a_run_directory_its_final_model_and_the_base_model_all_generate(run_dir):
    from_run = dylora("--model", run_dir, "--max_new_tokens", "12", "def add(a, b):")
    from_final = dylora("--model", run_dir / "final", "--max_new_tokens", "12", "def add(a, b):")
    from_base = dylora("--model", "tiny-python-lm", "--max_new_tokens", "12", "def add(a, b):")
    for proc in (from_run, from_final, from_base):
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "prompt: def add(a, b):" in proc.stderr and "tiny demo model" in proc.stderr
    assert from_run.stdout == from_final.stdout and from_run.stdout.strip()  # the run's final/ model
    assert "the mixture" in from_run.stderr and "2 experts" in from_run.stderr
    assert "the base model tiny-python-lm (no experts)" in from_base.stderr
    assert from_base.stdout != from_final.stdout  # the experts change what it says
