"""``dylora train``: its flags (one per :class:`~dylora_moe.train.config.TrainConfig` field) and its handler."""

from __future__ import annotations

import argparse

from ..errors import TRAINING_EXIT_STATUS_HELP
from ..runtime.launcher import is_main_process
from .config import add_train_arguments, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a mixture (no arguments: the shipped tiny model on the built-in dataset)",
        description="Train a DyLoRA-MoE mixture. With no arguments it trains the shipped tiny-python-lm on "
        "the built-in stdlib_functions dataset on CPU in a few minutes.", epilog=TRAINING_EXIT_STATUS_HELP,
    )
    add_train_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train; ``args.signals`` is the process's :class:`~dylora_moe.runtime.signals.SignalWatch`, which the
    trainer takes over to checkpoint on SIGTERM/SIGINT."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    config = config_from_args(args)
    main_process = is_main_process()  # under torchrun: rank 0 alone checks the store, writes and reports
    if config.checkpoint_store and config.checkpoint_store != "wandb" and main_process:
        # Fail fast on a store that cannot work, before torch and the model load (the trainer checks
        # again, for library use and for the default and W&B stores).
        from ..checkpoint.stores import open_store
        from ..checkpoint.stores.probe import probe_store

        probe_store(open_store(config.checkpoint_store, timeout_s=config.store_timeout_s), config.store_timeout_s)
    from .trainer import Trainer

    with logging_redirect_tqdm():  # log lines print above the progress bar, not through it
        summary = Trainer(config, signals=args.signals).setup().train()
    if main_process:
        from .report import next_steps

        print(
            f"done: held-out loss {summary['eval_loss_base']:.4f} (base) -> {summary['eval_loss_final']:.4f} "
            f"(trained) in {summary['steps']} steps; model in {summary['model_dir']}\n{next_steps(summary)}"
        )
    return 0
