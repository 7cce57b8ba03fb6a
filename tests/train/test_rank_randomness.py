"""Each rank draws its own dropout: the fast suite's check of what only the slow multi-rank runs
would otherwise show (every rank drawing the same masks trains, just worse)."""

from __future__ import annotations

import torch

from dylora_moe.train.config import TrainConfig
from dylora_moe.train.distributed import Ranks
from dylora_moe.train.trainer import Trainer


def draws_after(rank: int, seed: int = 42) -> torch.Tensor:
    ranks = Ranks(world_size=2, rank=rank)
    ranks.seed(seed)
    weights = torch.rand(4)  # the initial weights: drawn before diverging, alike on every rank
    ranks.diverge(seed)
    return torch.cat([weights, torch.rand(8)])


def test_ranks_start_alike_and_then_draw_their_own_numbers():
    rank0, rank1, rank1_again = draws_after(0), draws_after(1), draws_after(1)
    assert torch.equal(rank0[:4], rank1[:4])  # the same initial weights everywhere
    assert not torch.equal(rank0[4:], rank1[4:])  # then each rank its own dropout
    assert torch.equal(rank1, rank1_again)  # and reproducibly so (exact resume)


def test_the_trainer_diverges_the_ranks_after_building_the_model(small_model_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Ranks, "diverge", lambda self, seed: calls.append(seed))
    trainer = Trainer(TrainConfig(model_name=small_model_dir, output_dir=str(tmp_path), run_id="d", report_to="none",
                                  progress=False, max_seq_length=64, training_subset=2, max_steps=1, seed=5)).setup()
    try:
        assert calls == [5]
    finally:
        trainer.close()
