"""Shared helpers: small real checkpoints, and a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dylora_moe.checkpoint.commit import write_checkpoint
from dylora_moe.checkpoint.format import checkpoint_name


def payload(step: int) -> dict[str, bytes]:
    """Distinct bytes per step, with a nested file, like weights + optimizer + data state."""
    return {
        "trainable.safetensors": bytes(range(256)) * 4 + step.to_bytes(4, "little"),
        "optimizer/state.json": json.dumps({"step": step, "lr": 1e-4}).encode(),
        "data_state.json": json.dumps({"epoch": 0, "position": step * 8}).encode(),
    }


def make_checkpoint(parent: Path, step: int, **fields) -> Path:
    def write_files(staging: Path) -> None:
        for rel, data in payload(step).items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)

    fields.setdefault("epoch", 0)
    fields.setdefault("wandb", {"run_id": "run1", "step": step})
    return write_checkpoint(parent, checkpoint_name(step), write_files,
                            {"global_step": step, **fields})


@pytest.fixture
def ckpts(tmp_path):
    """A run's checkpoints directory and a factory for checkpoints in it."""
    parent = tmp_path / "run" / "checkpoints"
    return parent, lambda step, **kw: make_checkpoint(parent, step, **kw)

