"""``dylora export`` and ``dylora merge`` on a mixture trained a few steps on two datasets."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dylora_moe.cli import main
from dylora_moe.data import PaddingCollator, build_datasets
from dylora_moe.model import DyLoRAMoE
from dylora_moe.model.base import load_base_model, load_tokenizer
from dylora_moe.train.config import TrainConfig
from dylora_moe.train.routing_report import eval_batches
from dylora_moe.train.trainer import Trainer
from tests.conftest import REPO_ROOT, SHARED_DATASETS

DATASETS = ["code_alpaca", "mbpp"]
RUN = dict(datasets=",".join(DATASETS), training_subset=2, max_seq_length=64, eval_subset=20, validation_fraction=0.05,
           seed=7)  # a seed other than the default: the held-out split must come from the run's config


@pytest.fixture(scope="module")
def run_dir(small_model_dir, tmp_path_factory):
    """Three experts trained three steps (per-example routing, dense) on code_alpaca and mbpp."""
    out = tmp_path_factory.mktemp("runs")
    Trainer(TrainConfig(model_name=small_model_dir, output_dir=str(out), run_id="a", report_to="none", progress=False,
                        data_dir=str(SHARED_DATASETS), max_steps=3, eval_steps=0, num_experts=3, lora_r=2,
                        learning_rate=2e-2, **RUN)).setup().train()
    return out / "a"


def held_out_prompts(tokenizer, name):
    _, eval_data, _ = build_datasets([name], tokenizer, RUN["max_seq_length"], data_dir=str(SHARED_DATASETS),
                                     seed=RUN["seed"], validation_fraction=RUN["validation_fraction"],
                                     training_subset=1, eval_subset=RUN["eval_subset"])
    return eval_data


def mean_gates_one_by_one(model, tokenizer, name):
    """Each layer's router gate averaged over the dataset's held-out prompts, one prompt per forward pass."""
    captured = []
    hooks = [layer.router.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()[0, 0]))
             for _, layer in model.adapted_layers()]
    collator = PaddingCollator.for_tokenizer(tokenizer)
    gates = []
    with torch.no_grad():
        for batch, _ in eval_batches(held_out_prompts(tokenizer, name), collator, 1):
            captured.clear()
            model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            gates.append(torch.stack(captured))
    for h in hooks:
        h.remove()
    return torch.stack(gates).mean(0)


def test_dataset_all_writes_one_prototype_per_training_dataset(run_dir, tmp_path, capsys):
    """From the run's final/ directory: the datasets and their held-out split come from the run's config."""
    assert main(["export", "--model", str(run_dir / "final"), "--gate", "dataset:all", "--out", str(tmp_path / "out"),
                 "--data_dir", str(SHARED_DATASETS)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == DATASETS
    model = DyLoRAMoE.from_pretrained(run_dir / "final").eval()
    tokenizer = load_tokenizer(str(run_dir / "final"))
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    prototypes = {}
    for name in DATASETS:
        record = json.loads((tmp_path / "out" / name / "dylora_gate.json").read_text())
        assert record["gate"] == f"dataset:{name}" and f"dataset:{name}: rank 6" in printed
        prototypes[name] = torch.tensor([record["gates"][n] for n in model.adapted_names])
        torch.testing.assert_close(prototypes[name], mean_gates_one_by_one(model, tokenizer, name),
                                   atol=1e-5, rtol=1e-5)
        model.force_gates(prototypes[name])
        with torch.no_grad():
            expected = model(ids).logits
        model.force_gates(None)
        adapter = PeftModel.from_pretrained(load_base_model(model.config.base_model_name_or_path),
                                            str(tmp_path / "out" / name)).eval()
        with torch.no_grad():
            torch.testing.assert_close(adapter(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(prototypes["code_alpaca"], prototypes["mbpp"], atol=1e-4)  # two different prototypes


def test_a_checkpoint_reference_gives_the_same_prototype(run_dir, tmp_path):
    """A store reference: its manifest's training config gives the held-out split."""
    assert main(["export", "--model", f"{run_dir}/store:latest", "--gate", "dataset:mbpp", "--out", str(tmp_path / "m"),
                 "--data_dir", str(SHARED_DATASETS)]) == 0
    assert main(["export", "--model", str(run_dir / "final"), "--gate", "dataset:mbpp", "--out", str(tmp_path / "f"),
                 "--data_dir", str(SHARED_DATASETS)]) == 0
    read = lambda d: json.loads((tmp_path / d / "dylora_gate.json").read_text())["gates"]  # noqa: E731
    assert read("m") == read("f")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dylora_moe", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})


def test_cli_merge_writes_a_plain_model_that_gives_the_forced_logits(run_dir, tmp_path):
    proc = run_cli("merge", "--model", str(run_dir / "final"), "--gate", "uniform", "--out", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    assert "uniform: rank 6" in proc.stdout and "merged into" in proc.stdout
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert load_tokenizer(str(tmp_path / "merged")).eos_token_id is not None
    model = DyLoRAMoE.from_pretrained(run_dir / "final").eval()
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    model.force_gates(torch.full((len(model.adapted_names), 3), 1 / 3))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert not list(tmp_path.glob(".merged.partial-*"))


@pytest.mark.parametrize("command, gate, message", [
    ("export", "expert:9", "expert index 9 is out of range: the mixture has 3 experts"),
    ("export", "sideways", "'sideways' is not a gate; accepted: expert:N"),
    ("merge", "dataset:all", "merge one prototype at a time"),
    pytest.param("export", "dataset:nope", "'nope' is not one of the datasets the mixture was trained on (code_alpaca, "
                 "mbpp)", marks=pytest.mark.slow),
    pytest.param("merge", "BAD_JSON", "is not a readable JSON gates file", marks=pytest.mark.slow),
    pytest.param("export", "WRONG_SHAPE",
                 "has gates of the wrong shape for this mixture (6 adapted layers x 3 experts)",
                 marks=pytest.mark.slow),
])
def test_cli_bad_input_exits_2_with_one_paragraph_and_writes_nothing(run_dir, tmp_path, command, gate, message):
    (tmp_path / "bad.json").write_text('{"gates": [0.5, ')
    (tmp_path / "shape.json").write_text("[[1, 0], [0, 1]]")
    gate = {"BAD_JSON": str(tmp_path / "bad.json"), "WRONG_SHAPE": str(tmp_path / "shape.json")}.get(gate, gate)
    proc = run_cli(command, "--model", str(run_dir / "final"), "--gate", gate, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith(f"dylora {command}: error:")]) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_refusals_in_process(run_dir, small_model_dir, tmp_path, capsys):
    """A non-empty --out, dataset:all without a known run, token routing for merge: exit 2, nothing written."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", "--model", str(run_dir / "final"), "--gate", "uniform",
                 "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert main(["export", "--model", str(run_dir / "final"), "--gate", "uniform", "--out", str(tmp_path / "full"),
                 "--overwrite"]) == 0
    assert (tmp_path / "full" / "adapter_config.json").is_file() and not (tmp_path / "full" / "keep.txt").exists()

    from dylora_moe.model import DyLoRAConfig

    alone = tmp_path / "alone"  # a saved mixture outside any run: no training config
    token = DyLoRAMoE(load_base_model(small_model_dir), DyLoRAConfig(num_experts=2, r=2, routing="token"))
    token.config.base_model_name_or_path = small_model_dir
    token.save_pretrained(alone)
    assert main(["export", "--model", str(alone), "--gate", "dataset:all", "--out", str(tmp_path / "o1")]) == 2
    assert "name them with --datasets" in capsys.readouterr().err
    assert main(["merge", "--model", str(alone), "--gate", "expert:0", "--out", str(tmp_path / "o2")]) == 2
    assert "cannot merge a mixture with token routing" in capsys.readouterr().err
    assert main(["export", "--model", str(alone), "--gate", "expert:1", "--out", str(tmp_path / "o3")]) == 0
    assert "routes every token on its own" in capsys.readouterr().err  # allowed, with a note
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
