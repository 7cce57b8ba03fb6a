import torch

from dylora_moe.train.callbacks import EarlyStopping
from dylora_moe.train.config import TrainConfig
from dylora_moe.train.state import TrainerState
from dylora_moe.train.trainer import Trainer


def bare_trainer(**overrides):
    trainer = Trainer(TrainConfig(**overrides))
    trainer.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=trainer.config.learning_rate)
    trainer.total_steps = 100
    return trainer


def learning_rates(trainer):
    scheduler, rates = trainer._make_scheduler(), []
    for _ in range(trainer.total_steps):
        rates.append(scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        scheduler.step()
    return rates


def test_cosine_schedule_warms_up_then_decays_to_zero():
    rates = learning_rates(bare_trainer(learning_rate=1e-3, warmup_ratio=0.1))
    assert rates[0] == 0.0 and abs(max(rates) - 1e-3) < 1e-9 and rates.index(max(rates)) == 10
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[-1] < 1e-5


def test_cosine_with_restarts_goes_back_up():
    rates = learning_rates(bare_trainer(learning_rate=1e-3, warmup_ratio=0.0, cosine_restarts=2))
    rises = [i for i in range(1, 100) if rates[i] > rates[i - 1] + 1e-4]
    assert len(rises) == 2  # three cycles: two jumps back to the peak
    assert all(rates[i] > 0.99e-3 for i in rises)  # back near the peak


def test_early_stopping_after_patience_evaluations_without_improvement():
    stopping, state = EarlyStopping.for_config(TrainConfig(early_stopping_patience=2)), TrainerState()
    decisions = [stopping.record(state, loss) for loss in (3.0, 2.5, 2.6, 2.5, 2.4, 2.45, 2.41)]
    assert decisions == [False, False, False, True, False, False, True]
    assert state.best_eval_loss == 2.4


def test_disable_early_stopping_never_stops():
    stopping = EarlyStopping.for_config(TrainConfig(early_stopping_patience=1, disable_early_stopping=True))
    state = TrainerState()
    assert not any(stopping.record(state, loss) for loss in (1.0, 2.0, 3.0, 4.0))
