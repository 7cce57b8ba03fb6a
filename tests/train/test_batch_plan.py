"""BatchPlan: the global batch of a fresh run, and a checkpoint's kept on another number of ranks."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from dylora_moe.errors import ConfigError
from dylora_moe.train.batch_plan import BatchPlan


def saved(world_size: int, micro_batches_per_step: int, train_batch_size: int = 4):
    return SimpleNamespace(world_size=world_size, micro_batches_per_step=micro_batches_per_step,
                           data_state={"train_batch_size": train_batch_size})


def test_a_fresh_run_takes_ranks_times_accumulation():
    plan = BatchPlan.for_run(world_size=2, gradient_accumulation_steps=3, train_batch_size=4)
    assert (plan.micro_batches_per_step, plan.accumulation, plan.global_batch) == (6, 3, 24)
    assert plan.steps(25, max_steps=0, num_epochs=1.5) == (4, 6) and plan.steps(25, 10, 1.5) == (4, 10)
    assert plan.change(3) == ""


def test_the_samplers_give_each_rank_its_share_in_whole_optimizer_steps():
    plans = [BatchPlan.for_run(world_size=2, gradient_accumulation_steps=2, train_batch_size=2, rank=r) for r in (0, 1)]
    train = [p.samplers(list(range(1, 22)), list(range(1, 6)), eval_batch_size=2, seed=0) for p in plans]
    assert train[0][0].global_num_batches % 4 == 0 and train[0][0].num_batches == train[1][0].num_batches
    mine = [set(i for batch in sampler.rank_batches(0) for i in batch) for sampler, _ in train]
    assert mine[0] | mine[1] == set(range(21)) and mine[0] != mine[1]  # each rank its share of every example
    assert train[0][1].num_batches == train[1][1].num_batches  # every rank evaluates as many batches


def test_a_resume_keeps_the_checkpoints_global_batch_on_another_world_size():
    plan = BatchPlan.for_run(world_size=1, gradient_accumulation_steps=1, train_batch_size=4, saved=saved(2, 2))
    assert (plan.micro_batches_per_step, plan.accumulation, plan.global_batch) == (2, 2, 8)
    assert plan.change(1) == ("; saved by 2 rank(s) x 1 accumulation, continued on 1 rank(s) x 2 accumulation: "
                              "the same global batch of 2 micro-batches")
    same = BatchPlan.for_run(world_size=2, gradient_accumulation_steps=1, train_batch_size=4, saved=saved(2, 2))
    assert same.change(1) == ""


def test_a_world_size_that_cannot_reproduce_the_global_batch_is_refused():
    with pytest.raises(ConfigError, match=r"global batch of 3 micro-batches .* 2 ranks cannot reproduce: .* "
                                          r"divides 3 \(e\.g\. 1, 3\)"):
        BatchPlan.for_run(world_size=2, gradient_accumulation_steps=1, train_batch_size=4, saved=saved(1, 3))


def test_another_batch_size_is_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        plan = BatchPlan.for_run(world_size=1, gradient_accumulation_steps=1, train_batch_size=2, saved=saved(1, 1))
    assert plan.global_batch == 2 and "--train_batch_size 2 differs from the checkpoint's 4" in caplog.text
