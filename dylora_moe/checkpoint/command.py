"""``dylora ckpt list | show | verify REF``: checkpoints as the store holds them (``inspect.py``).

Imports neither torch nor the libraries of training: the CLI leaves them unloaded for this command.
"""

from __future__ import annotations

import argparse

from ..errors import EXIT_STATUS_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ckpt", help="list, show or verify checkpoints",
        description="Inspect checkpoints. REF, the one reference syntax of train --resume, eval/generate --model, "
        "report routing --model and submit: a checkpoint, run or checkpoints directory; DIR:ALIAS of a local store "
        "(runs/RUN_ID/store:latest); wandb://ENTITY/PROJECT/NAME[:ALIAS], or the seed's ENTITY/PROJECT/NAME:ALIAS "
        "(W&B when no such local directory exists); s3:// gs:// file:// URLs of a store followed by :ALIAS "
        "(s3://BUCKET/PATH/store:latest), or of one checkpoint folder. ALIAS: a version (v3) or an alias (latest, "
        "best, step-120). latest (with a run directory) and auto belong to train --resume.", epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("action", choices=["list", "show", "verify"],
                        help="list: versions/checkpoints; show: manifest and fingerprint; verify: every checksum")
    parser.add_argument("ref", help="checkpoint reference")
    return parser


def run(args: argparse.Namespace) -> int:
    from . import inspect

    print({"list": inspect.list_refs, "show": inspect.show, "verify": inspect.verify}[args.action](args.ref))
    return 0
