"""The recipe's parts stay apart: the checkpoint package knows nothing of training, the trainer
reaches checkpoints only through its Checkpointer, and ``train_step`` is a usable public step."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dylora_moe.train.config import TrainConfig
from dylora_moe.train.trainer import Trainer

PACKAGE = Path(__file__).resolve().parents[2] / "dylora_moe"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the dylora_moe modules that ``path`` imports (relative imports resolved)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            names.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("dylora_moe")}


def test_the_checkpoint_package_imports_nothing_from_training():
    for path in (PACKAGE / "checkpoint").rglob("*.py"):
        assert not [m for m in imported_modules(path) if m.startswith("dylora_moe.train")], path


def test_the_recipe_parts_do_not_import_the_trainer():
    for name in ("state", "history", "checkpoint_payload", "checkpointing", "callbacks"):
        assert "dylora_moe.train.trainer" not in imported_modules(PACKAGE / "train" / f"{name}.py"), name


def test_the_trainer_reaches_checkpoints_only_through_the_checkpointer():
    used = {m for m in imported_modules(PACKAGE / "train" / "trainer.py") if m.startswith("dylora_moe.checkpoint")}
    assert used == {"dylora_moe.checkpoint.stores"}  # for the type of a store a library user passes in


@pytest.mark.slow
def test_train_step_updates_the_trainable_weights_and_reports_the_step(small_model_dir, tmp_path):
    trainer = Trainer(TrainConfig(model_name=small_model_dir, output_dir=str(tmp_path), run_id="step", report_to="none",
                                  progress=False, max_seq_length=64, training_subset=4, train_batch_size=2,
                                  eval_steps=0, save_steps=0, warmup_ratio=0.0)).setup()
    trainer.sampler.set_epoch(0)
    batches = iter(DataLoader(trainer.train_data, batch_sampler=trainer.sampler, collate_fn=trainer.collator))
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    micro = [next(batches), next(batches)]
    metrics = trainer.train_step(micro)
    assert metrics["tokens"] == sum(int(b["attention_mask"].sum()) for b in micro)
    assert metrics["train/lm_loss"] > 0
    assert len([k for k in metrics if k.startswith("routing/usage_")]) == trainer.model.num_experts
    norms = [metrics[f"grad_norm/expert_{e}"] for e in range(trainer.model.num_experts)]  # DyLoRAMoE.expert_grad_norms
    assert all(n >= 0 for n in norms) and sum(norms) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.trainable_parameters()))
    assert trainer.state.global_step == 0  # progress is the loop's to advance
    trainer.close()
