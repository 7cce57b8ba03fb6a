"""Where metrics go: Weights & Biases when configured, TensorBoard otherwise (or nowhere).

``wandb_configured`` is what every command asks (``dylora train``'s ``--report_to auto``, ``dylora eval``'s);
the sinks are the trainer's. wandb and tensorboard are imported only when a sink is made.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_configured() -> bool:
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") or os.environ.get("WANDB_BASE_URL"))


class MetricsSink:
    name = "none"
    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class TensorBoardSink(MetricsSink):
    name = "tensorboard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, exit_code: int = 0) -> None:
        self.writer.close()


class WandbSink(MetricsSink):
    """One W&B run per run id: a restarted job continues the same run (``resume="allow"``)."""

    name = "wandb"

    def __init__(self, run_id: str, project: str, entity: str | None, config: dict[str, Any], run_dir: Path):
        import wandb

        self.run = wandb.init(
            project=project, entity=entity, id=run_id, resume="allow", config=config,
            dir=str(run_dir), name=run_id, reinit="finish_previous",
        )
        self.run_id = self.run.id
        # Our optimizer step is the x-axis, not W&B's own step: a job that resumes from a
        # checkpoint older than the run's last logged step would otherwise have its metrics
        # dropped ("Tried to log to step 3 that is less than the current step 5").
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "global_step": step})

    def finish(self, exit_code: int = 0) -> None:
        if exit_code:
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)


def make_sink(report_to: str, run_id: str, run_dir: Path, project: str, entity: str | None,
              config: dict) -> MetricsSink:
    if report_to == "auto":
        report_to = "wandb" if wandb_configured() else "tensorboard"
    if report_to == "wandb":
        return WandbSink(run_id, project, entity, config, run_dir)
    if report_to == "tensorboard":
        return TensorBoardSink(run_dir / "tensorboard")
    return MetricsSink()
