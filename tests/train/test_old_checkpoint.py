"""A checkpoint written before the trainer's redesign still resumes: same files, same names.

``tests/fixtures/checkpoint_v_before_redesign`` is step 2 of a run of the code before the redesign
(commit d32de18), written by one process on the shipped model:

    dylora train --run_id fixture --max_steps 2 --save_steps 2 --eval_steps 2 --max_seq_length 64 \
        --num_experts 2 --lora_r 2 --training_subset 5 --train_batch_size 4 --logging_steps 1 \
        --report_to none --progress false

Its files are checksummed in its manifest.json: never edit them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dylora_moe.checkpoint.format import verify_checkpoint
from dylora_moe.train.config import TrainConfig
from dylora_moe.train.trainer import Trainer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v_before_redesign"


def equal_trees(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_trees(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal_trees(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    verify_checkpoint(FIXTURE)  # the fixture itself is intact
    copy = tmp_path / "old" / "step-00000002"
    shutil.copytree(FIXTURE, copy)
    return copy


def test_a_checkpoint_of_the_code_before_the_redesign_resumes_and_trains_on(checkpoint, tmp_path):
    trainer = Trainer(TrainConfig(output_dir=str(tmp_path), run_id="after", report_to="none", progress=False,
                                  max_seq_length=64, num_experts=2, lora_r=2, training_subset=5, train_batch_size=4,
                                  max_steps=3, eval_steps=0, save_steps=0, resume=str(checkpoint))).setup()
    st = trainer.state
    assert (st.global_step, st.epoch, st.batch_in_epoch) == (2, 0, 2)
    saved = load_file(str(checkpoint / "dylora_model.safetensors"))
    assert equal_trees(trainer.model.trainable_state_dict(), saved)  # the weights, exactly
    assert equal_trees(trainer.optimizer.state_dict()["state"],
                       torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"])
    saved_groups = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"]
    schedule = ("lr", "initial_lr")  # this run's schedule, at the checkpoint's step
    assert [{k: v for k, v in g.items() if k not in schedule} for g in trainer.optimizer.state_dict()["param_groups"]] \
        == [{k: v for k, v in g.items() if k not in schedule} for g in saved_groups]
    assert isinstance(trainer.optimizer.param_groups[0]["betas"], tuple)
    assert trainer.scheduler.last_epoch == 2

    summary = trainer.train()
    assert summary["steps"] == 3 and trainer.state.batch_in_epoch == 3
    after = load_file(str(tmp_path / "after" / "final" / "dylora_model.safetensors"))
    assert after.keys() == saved.keys() and any(not torch.equal(after[k], saved[k]) for k in saved)  # trained on
    # ... and its own checkpoint holds the same files, under the same names
    written = tmp_path / "after" / "checkpoints" / "step-00000003"
    manifest = verify_checkpoint(written)
    assert sorted(manifest.files) == sorted(json.loads((FIXTURE / "manifest.json").read_text())["files"])
    assert manifest.fingerprint == {**json.loads((FIXTURE / "manifest.json").read_text())["fingerprint"],
                                    **{k: manifest.fingerprint[k] for k in ("maturity",)}}
