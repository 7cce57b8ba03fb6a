"""The ``dylora`` command line: the table of its subcommands, and what every command shares.

Each subcommand lives in its own folder as a module with ``add_parser(subparsers)`` (its flags; light
to import, so ``dylora --help`` loads no torch) and ``run(args)`` (which imports what the command
needs and returns its exit status). Around them: the signal watch from the first moment, logging,
and the error report: user mistakes (:class:`~dylora_moe.errors.DyLoRAError`) print one paragraph
on stderr and exit with the error's status; they never show a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import ModuleType

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, TRAINING_EXIT_STATUS_HELP, DyLoRAError
from .runtime.launcher import is_main_process, launched_rank, launched_world_size, stop_with_the_launcher
from .runtime.signals import SIGNALS, SignalWatch, StartupInterrupted


def commands() -> tuple[ModuleType, ...]:
    """The subcommands, in the order ``dylora --help`` lists them.

    Imported here rather than with this module, so that ``main`` has installed the signal watch first.
    """
    from .checkpoint import command as ckpt
    from .cloud import command as submit
    from .eval import command as eval_
    from .export import command as export
    from .export import merge_command as merge
    from .generate import command as generate
    from .serve import command as serve
    from .train import command as train
    from .train import report_command as report

    return train, generate, serve, ckpt, eval_, export, merge, submit, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dylora", description="Dynamic LoRA Mixture of Experts for code LLMs.",
                                     epilog=TRAINING_EXIT_STATUS_HELP)
    parser.add_argument("--version", action="version", version=f"dylora-moe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands():
        command.add_parser(subparsers).set_defaults(run=command.run)
    return parser


def _quiet_libraries() -> None:
    """Our own progress bar and log say what happens; the libraries' per-step bars only add noise."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # Examples longer than the model's window are cut by our template; the tokenizer's warning
    # about the untruncated text is noise.
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    # Spot VMs are reclaimed during start-up too: from the first moment, SIGTERM/SIGINT end the command
    # with one line and status 75 (training then takes them over to checkpoint first).
    signals = SignalWatch().install()
    stop_with_the_launcher()  # a rank whose torchrun is killed gets SIGTERM: it checkpoints and exits 75
    status = None
    try:
        status = _run(argv, signals)
    except StartupInterrupted as stop:  # before the trainer existed (imports, parsing)
        status = _report(stop.as_preempted(), "train")
    finally:
        if status == EXIT_PREEMPTED and launched_world_size() > 1:
            # One rank of a launched job, stopped with its checkpoint saved: the launcher tears the other
            # ranks down with SIGTERM as soon as one exits, and that must not turn this rank's 75 into a kill.
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        else:
            signals.restore()
    return status


def _run(argv: list[str] | None, signals) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.signals = signals
    if args.command != "train":
        signals.restore()  # only training has a checkpoint to protect and a 75 to promise
    # under a launcher, ranks other than 0 say only what goes wrong (and which rank they are)
    rank = "" if is_main_process() else f"[rank {launched_rank()}] "
    level = logging.DEBUG if args.verbose else logging.INFO if not rank else logging.WARNING
    logging.basicConfig(level=level, format=f"{rank}%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose and args.command not in (None, "ckpt"):  # ckpt needs neither library: no import
        _quiet_libraries()
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.run(args)
    except DyLoRAError as err:
        return _report(err, args.command)
    except BrokenPipeError:  # the reader went away (`dylora ckpt list ... | head`): nothing left to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 0


def _report(err: DyLoRAError, command: str) -> int:
    paragraph = " ".join(str(err).split())  # one paragraph, whatever the underlying library wrote
    kind = "stopped" if err.exit_code == EXIT_PREEMPTED else "error"
    # one write: the ranks of a launched job share one stream, and lines written in pieces interleave
    sys.stderr.write(f"dylora{' ' + command if command else ''}: {kind}: {paragraph}\n")
    sys.stderr.flush()
    if getattr(err, "table", None):
        print(err.table, file=sys.stderr)
    return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
