"""The router options of `dylora train` reach the model: the dataset-MI loss gets each example's dataset."""

from __future__ import annotations

import torch

from dylora_moe.data.collate import PaddingCollator
from dylora_moe.train.config import TrainConfig
from dylora_moe.train.trainer import Trainer
from tests.conftest import SHARED_DATASETS


def test_the_collator_numbers_each_examples_dataset():
    collate = PaddingCollator(0, sources=["code_alpaca", "mbpp"])
    batch = collate([{"input_ids": [1, 2], "labels": [-100, 2], "source": "mbpp"},
                     {"input_ids": [3], "labels": [3], "source": "code_alpaca"}])
    assert batch["dataset_ids"].tolist() == [1, 0]
    assert "dataset_ids" not in PaddingCollator(0)([{"input_ids": [1], "labels": [1], "source": "mbpp"}])


def run(small_model_dir, tmp_path, run_id, **options):
    config = TrainConfig(model_name=small_model_dir, datasets="stdlib_functions,code_alpaca",
                         data_dir=str(SHARED_DATASETS), interleaved_sampling=True, report_to="none", progress=False,
                         max_seq_length=64, training_subset=5, eval_subset=10, train_batch_size=8, max_steps=3,
                         eval_steps=0, save_steps=0, logging_steps=1, output_dir=str(tmp_path), run_id=run_id,
                         **options)
    trainer = Trainer(config).setup()
    first = next(iter(torch.utils.data.DataLoader(trainer.train_data, batch_sampler=trainer.sampler,
                                                  collate_fn=trainer.collator)))
    trainer.train()
    return trainer, first, [row["train/lm_loss"] for row in trainer.full_history() if "train/lm_loss" in row]


def test_dataset_mi_coefficient_trains_with_each_examples_dataset(small_model_dir, tmp_path):
    plain, plain_batch, plain_losses = run(small_model_dir, tmp_path, "plain", dataset_mi_coefficient=0.0)
    dmi, dmi_batch, dmi_losses = run(small_model_dir, tmp_path, "dmi", dataset_mi_coefficient=0.3, gate_floor=0.5)
    assert "dataset_ids" not in plain_batch
    assert set(dmi_batch["dataset_ids"].tolist()) <= {0, 1} and dmi.model.config.dataset_mi_coefficient == 0.3
    assert dmi.model.config.gate_floor == 0.5
    # B = 0 at the start, so step 1 is the base model's loss in both; the router terms change what follows
    assert dmi_losses[0] == plain_losses[0] and dmi_losses[1:] != plain_losses[1:]


def test_shared_experts_train_and_are_saved_with_the_final_model(small_model_dir, tmp_path):
    import json

    from safetensors.torch import load_file

    trainer, _, losses = run(small_model_dir, tmp_path, "shared", num_experts=3, shared_experts=1)
    final = trainer.run_dir / "final"
    assert json.loads((final / "dylora_config.json").read_text())["shared_experts"] == 1
    assert trainer.model.config.alpha == 32 * 4 * 16  # derived from all four experts
    weights = load_file(str(final / "dylora_model.safetensors"))
    shared_B = [v for k, v in weights.items() if k.endswith(".shared_B")]
    assert len(shared_B) == len(list(trainer.model.adapted_layers())) and all(b.abs().sum() > 0 for b in shared_B)
    assert len(losses) == 3
