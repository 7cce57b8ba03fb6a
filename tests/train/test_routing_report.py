"""``dylora report routing``: per-dataset expert usage, mutual information, heatmap."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dylora_moe.data import PaddingCollator, build_datasets
from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
from dylora_moe.model.base import load_base_model, load_tokenizer
from dylora_moe.train.routing_report import collect_routing, eval_batches, mutual_information

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = str(REPO.parent / "shared" / "datasets")
DATASETS = ["code_alpaca", "mbpp"]


def test_mutual_information_in_bits():
    assert mutual_information(torch.eye(4) * 10) == pytest.approx(2.0)
    assert mutual_information(torch.ones(4, 4)) == pytest.approx(0.0)
    assert mutual_information(torch.tensor([[3.0, 1.0], [1.0, 3.0]])) == pytest.approx(
        1 - (-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))))


@pytest.fixture(scope="module")
def mixture_dir(small_model_dir, tmp_path_factory):
    model = DyLoRAMoE(load_base_model(small_model_dir), DyLoRAConfig(num_experts=3, r=2, routing="example"))
    model.config.base_model_name_or_path = small_model_dir
    path = tmp_path_factory.mktemp("mixture")
    model.save_pretrained(path)
    load_tokenizer(small_model_dir).save_pretrained(path)
    return path


def test_counts_follow_the_expert_each_dataset_is_sent_to(mixture_dir):
    model = DyLoRAMoE.from_pretrained(mixture_dir)
    tokenizer = load_tokenizer(str(mixture_dir))
    _, eval_data, _ = build_datasets(DATASETS, tokenizer, 128, data_dir=DATA_DIR, training_subset=1,
                                     eval_subset=20)
    collator = PaddingCollator.for_tokenizer(tokenizer)

    def forced():  # every batch of dataset d goes to expert 2 * d
        for batch, sources in eval_batches(eval_data, collator, 4):
            for d, name in enumerate(DATASETS):
                keep = [i for i, s in enumerate(sources) if s == name]
                if keep:
                    model.force_expert(2 * d)
                    yield {k: v[keep] for k, v in batch.items()}, [name] * len(keep)

    table = collect_routing(model, forced(), DATASETS)
    model.force_expert(None)
    assert table.usage().tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    counted = eval_data.to_pandas()["source"].value_counts()
    assert table.units.tolist() == [counted[n] for n in DATASETS]  # per-example routing: one unit per example
    share = [counted[n] / len(eval_data) for n in DATASETS]
    dataset_entropy = -sum(p * math.log2(p) for p in share)  # each dataset has its own expert: MI = H(dataset)
    assert table.mi_mean == pytest.approx(dataset_entropy) and table.mi_max == pytest.approx(dataset_entropy)
    assert table.mi_bound == pytest.approx(dataset_entropy)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dylora_moe.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                         "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_report_routing_cli_prints_the_table_and_writes_heatmap(mixture_dir):
    """The README's command, on a trained mixture directory: the report lands beside the model."""
    proc = run_cli("report", "routing", "--model", str(mixture_dir), "--datasets", "code_alpaca,mbpp",
                   "--data_dir", "../shared/datasets")
    tmp_path = mixture_dir
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "mutual information dataset ; top-1 expert" in proc.stdout
    assert "code_alpaca" in proc.stdout and "mbpp" in proc.stdout
    report = json.loads((tmp_path / "routing_report.json").read_text())
    assert report["granularity"] == "example" and report["datasets"] == DATASETS
    for row in report["top1_usage"].values():
        assert sum(row) == pytest.approx(1.0, abs=1e-3)
    assert 0.0 <= report["mutual_information_bits"]["mean"] <= report["mutual_information_bound_bits"] <= 1.0
    assert (tmp_path / "routing_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_routing_on_a_directory_that_is_no_mixture_is_a_clear_error(tmp_path):
    proc = run_cli("report", "routing", "--model", str(tmp_path), "--datasets", "mbpp")
    assert proc.returncode == 2
    assert "is not a trained mixture (no dylora_config.json)" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_report_routing_reads_the_runs_own_datasets_and_settings_and_verifies_checkpoints(tmp_path):
    """`dylora report routing --model runs/R/final` with no other flag gives the report training wrote
    (the run's datasets, split, sequence length); a damaged checkpoint is refused, not read."""
    train = run_cli("train", "--output_dir", str(tmp_path / "runs"), "--run_id", "r", "--datasets", "code_alpaca,mbpp",
                    "--data_dir", DATA_DIR, "--max_seq_length", "96", "--training_subset", "3", "--eval_subset", "30",
                    "--max_steps", "2", "--eval_steps", "0", "--report_to", "none", "--progress", "false",
                    "--seed", "7")
    assert train.returncode == 0, train.stderr
    run = tmp_path / "runs" / "r"
    trained = json.loads((run / "routing_report.json").read_text())
    proc = run_cli("report", "routing", "--model", str(run / "final"), "--output_dir", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again" / "routing_report.json").read_text())
    assert again["datasets"] == trained["datasets"] == DATASETS
    for key in ("mean", "max"):
        assert again["mutual_information_bits"][key] == pytest.approx(trained["mutual_information_bits"][key])
    for name in DATASETS:
        assert again["top1_usage"][name] == pytest.approx(trained["top1_usage"][name])

    (checkpoint,) = sorted((run / "checkpoints").glob("step-*"))[-1:]
    weights = next(checkpoint.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)  # damaged in place
    damaged = run_cli("report", "routing", "--model", str(checkpoint))
    assert damaged.returncode != 0 and "Traceback" not in damaged.stderr
    assert "failed verification: dylora_model.safetensors has sha256" in damaged.stderr, damaged.stderr
