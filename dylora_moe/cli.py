"""The ``dylora`` command line: ``train``, ``generate``.

User mistakes (:class:`~dylora_moe.errors.DyLoRAError`) print one paragraph on stderr and exit
with the error's status; they never show a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import __version__
from .errors import DyLoRAError

EPILOG = """exit status: 0 success, 1 error, 2 bad input (configuration, data, checkpoint reference,
fingerprint mismatch), 3 training finished but some checkpoints were not published to the store
(local copies kept; rerun with --resume auto to publish them), 75 stopped by SIGTERM/SIGINT (after a
durable checkpoint once training has started; continue with --resume auto)."""


def _train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .train.config import config_from_args
    from .train.launch_env import is_main_process

    config = config_from_args(args)
    main_process = is_main_process()  # under torchrun: rank 0 alone checks the store, writes and reports
    if config.checkpoint_store and config.checkpoint_store != "wandb" and main_process:
        # Fail fast on a store that cannot work, before torch and the model load (the trainer checks
        # again, for library use and for the default and W&B stores).
        from .checkpoint.stores import open_store
        from .checkpoint.stores.probe import probe_store

        probe_store(open_store(config.checkpoint_store, timeout_s=config.store_timeout_s), config.store_timeout_s)
    from .train.trainer import Trainer

    with logging_redirect_tqdm():  # log lines print above the progress bar, not through it
        summary = Trainer(config, signals=args.signals).setup().train()
    if main_process:
        print(
            f"done: held-out loss {summary['eval_loss_base']:.4f} (base) -> {summary['eval_loss_final']:.4f} "
            f"(trained) in {summary['steps']} steps; model in {summary['model_dir']}"
        )
    return 0


def _generate(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import torch

    from .checkpoint.references import fetch_model
    from .data import format_prompt
    from .model.dylora import load_trained_mixture

    with tempfile.TemporaryDirectory(prefix="dylora-generate-") as downloads:  # a fetched checkpoint, loaded then removed
        model, tokenizer = load_trained_mixture(fetch_model(args.model, Path(downloads)) or args.model)
    prompt = args.prompt if args.raw else format_prompt(args.prompt)
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def _ckpt(args: argparse.Namespace) -> int:
    from .checkpoint import inspect

    print({"list": inspect.list_refs, "show": inspect.show, "verify": inspect.verify}[args.action](args.ref))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train.config import add_train_arguments

    parser = argparse.ArgumentParser(prog="dylora", description="Dynamic LoRA Mixture of Experts for code LLMs.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"dylora-moe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train a mixture (no arguments: the shipped tiny model on the built-in dataset)",
        description="Train a DyLoRA-MoE mixture. With no arguments it trains the shipped tiny-python-lm on "
        "the built-in stdlib_functions dataset on CPU in a few minutes.", epilog=EPILOG,
    )
    add_train_arguments(train)
    train.set_defaults(func=_train)

    gen = sub.add_parser("generate", help="sample from a trained mixture", epilog=EPILOG)
    gen.add_argument("--model", required=True, metavar="REF", help="a trained mixture: a run's final/ directory "
                     "(runs/RUN_ID/final) or a checkpoint reference, as for dylora ckpt (fetched and verified)")
    gen.add_argument("prompt", help="the instruction (wrapped in the training prompt template unless --raw)")
    gen.add_argument("--raw", action="store_true", help="use the prompt as is, without the template")
    gen.add_argument("--max_new_tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    gen.add_argument("--top_p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)

    ckpt = sub.add_parser(
        "ckpt", help="list, show or verify checkpoints",
        description="Inspect checkpoints. REF, the one reference syntax of train --resume, eval/generate --model, "
        "report routing --model and submit: a checkpoint, run or checkpoints directory; DIR:ALIAS of a local store "
        "(runs/RUN_ID/store:latest); wandb://ENTITY/PROJECT/NAME[:ALIAS], or the seed's ENTITY/PROJECT/NAME:ALIAS "
        "(W&B when no such local directory exists); s3:// gs:// file:// URLs of a store followed by :ALIAS "
        "(s3://BUCKET/PATH/store:latest), or of one checkpoint folder. ALIAS: a version (v3) or an alias (latest, "
        "best, step-120). latest (with a run directory) and auto belong to train --resume.", epilog=EPILOG,
    )
    ckpt.add_argument("action", choices=["list", "show", "verify"],
                      help="list: versions/checkpoints; show: manifest and fingerprint; verify: every checksum")
    ckpt.add_argument("ref", help="checkpoint reference")
    ckpt.set_defaults(func=_ckpt)

    from .eval.config import add_eval_parser  # flags only: models and the sandbox load when it runs

    add_eval_parser(sub, EPILOG)

    from .cloud.command import add_submit_parser  # flags only: the cloud clients load when a job is sent

    add_submit_parser(sub, EPILOG)

    from .serve.command import add_parser as add_serve_parser  # flags only: torch and the server load when it runs

    add_serve_parser(sub, EPILOG)

    report = sub.add_parser("report", help="reports on a trained mixture (routing: which expert serves which dataset)",
                            epilog=EPILOG)
    report_sub = report.add_subparsers(dest="report", metavar="REPORT", required=True)
    routing = report_sub.add_parser(
        "routing", help="per-dataset expert usage, mutual information and a heatmap",
        description="Route the held-out split of each dataset through a trained mixture and report, per dataset, "
        "the share of top-1 choices per expert and the mean gate, the mutual information between dataset and "
        "top-1 expert (bits, per adapted layer: mean and max), and a datasets x experts heatmap. Writes "
        "routing_report.json and routing_heatmap.png (in --output_dir; default: a saved mixture's own directory, the "
        "current directory for a checkpoint reference, which is never written into).", epilog=EPILOG)
    routing.add_argument("--model", required=True, metavar="REF", help="a trained mixture: runs/RUN_ID/final or a checkpoint "
                         "reference, as for dylora ckpt (fetched and verified)")
    routing.add_argument("--datasets", required=True, metavar="A,B,...", help="comma-separated dataset names or files, as for train")
    routing.add_argument("--data_dir", metavar="DIR", default=None, help="offline directory serving named datasets (env DYLORA_DATA_DIR)")
    routing.add_argument("--output_dir", metavar="DIR", default=None, help="where to write the report (default: the mixture directory; for a checkpoint reference, the current directory)")
    routing.add_argument("--max_seq_length", type=int, default=256, metavar="N", help="longest tokenised example (default: 256)")
    routing.add_argument("--validation_fraction", type=float, default=0.05, metavar="X",
                         help="held-out share of each dataset, as in training (default: 0.05)")
    routing.add_argument("--eval_subset", type=float, default=100.0, metavar="X", help="percent of each held-out split (default: 100)")
    routing.add_argument("--seed", type=int, default=42, metavar="N", help="the training run's seed: it chose the held-out split (default: 42)")
    routing.set_defaults(func=_report_routing)
    return parser


def _report_routing(args: argparse.Namespace) -> int:
    import os

    from .train.routing_report import routing_report

    data_dir = args.data_dir or os.environ.get("DYLORA_DATA_DIR") or None
    table, json_path, png = routing_report(
        args.model, args.datasets, data_dir=data_dir, output_dir=args.output_dir, max_seq_length=args.max_seq_length,
        validation_fraction=args.validation_fraction, eval_subset=args.eval_subset, seed=args.seed)
    print(table.summary())
    print(f"wrote {json_path} and {png}")
    return 0


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
    from .train.launch_env import launched_world_size
    from .train.preemption import EXIT_PREEMPTED, SIGNALS, SignalWatch, StartupInterrupted

    # Spot VMs are reclaimed during start-up too: from the first moment, SIGTERM/SIGINT end the command
    # with one line and status 75 (training then takes them over to checkpoint first).
    signals = SignalWatch().install()
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
    from .train.launch_env import is_main_process, launched_rank

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
        return 2
    try:
        return args.func(args)
    except DyLoRAError as err:
        return _report(err, args.command)


def _report(err: DyLoRAError, command: str) -> int:
    paragraph = " ".join(str(err).split())  # one paragraph, whatever the underlying library wrote
    kind = "stopped" if err.exit_code == 75 else "error"
    # one write: the ranks of a launched job share one stream, and lines written in pieces interleave
    sys.stderr.write(f"dylora{' ' + command if command else ''}: {kind}: {paragraph}\n")
    sys.stderr.flush()
    if getattr(err, "table", None):
        print(err.table, file=sys.stderr)
    return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
