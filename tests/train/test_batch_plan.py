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
    assert plan.steps_per_epoch(25) == 4 and plan.change(3) == ""


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
