"""`dylora train --lora_alpha`: unset means 32 x (num_experts + shared_experts) x lora_r, and --help says so."""

import subprocess
import sys

import pytest

from dylora_moe.cli import build_parser
from dylora_moe.train.config import config_from_args
from tests.conftest import REPO_ROOT


def model_alpha(argv):
    return config_from_args(build_parser().parse_args(["train", *argv])).model_config().alpha


@pytest.mark.parametrize(("argv", "alpha"), [
    ([], 2048.0),  # 4 experts of rank 16
    (["--num_experts", "2", "--lora_r", "8"], 512.0),
    (["--num_experts", "6", "--lora_r", "4", "--lora_alpha", "0"], 768.0),
    (["--num_experts", "2", "--lora_r", "8", "--lora_alpha", "16"], 16.0),
])
def test_the_mixture_gets_the_derived_or_given_alpha(argv, alpha):
    assert model_alpha(argv) == alpha


def test_train_help_shows_how_alpha_is_derived():
    done = subprocess.run([sys.executable, "-m", "dylora_moe.cli", "train", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines
    assert "--lora_alpha X LoRA alpha (scaling alpha/r); unset or 0: derived" in text
    assert "with alpha 32 x that rank (2048 for 4 experts of rank 16)" in text
    assert "(default: 32 x (num_experts + shared_experts) x lora_r)" in text
