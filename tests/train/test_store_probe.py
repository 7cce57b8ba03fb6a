"""The trainer checks its store itself before training: library use and the default and W&B stores
are not covered by the CLI's early probe."""

from __future__ import annotations

import pytest

from dylora_moe.checkpoint.stores import LocalStore
from dylora_moe.errors import CheckpointError
from dylora_moe.train.config import TrainConfig
from dylora_moe.train.trainer import Trainer


class RefusingStore(LocalStore):
    """A real local store whose access is denied (as a bucket without permission answers)."""

    def __init__(self, root):
        super().__init__(root)
        self.probes = 0

    def probe(self):
        self.probes += 1
        raise PermissionError(13, "Permission denied", str(self.root))


def test_a_store_passed_to_the_trainer_is_probed_before_anything_trains(small_model_dir, tmp_path):
    store = RefusingStore(tmp_path / "store")
    trainer = Trainer(TrainConfig(model_name=small_model_dir, output_dir=str(tmp_path / "runs"), run_id="p",
                                  report_to="none", progress=False, max_seq_length=64, training_subset=2,
                                  max_steps=1, store_timeout_s=2.0), store=store)
    with pytest.raises(CheckpointError, match="cannot be used: .*Permission denied.* Nothing was trained"):
        trainer.setup()
    assert store.probes >= 1
    assert not list((tmp_path / "runs" / "p").glob("checkpoints/step-*"))
    assert not (tmp_path / "runs" / "p" / "final").exists()
