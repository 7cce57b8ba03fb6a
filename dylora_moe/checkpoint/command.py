"""``dylora ckpt list | show | verify REF``: checkpoints as the store holds them (``inspect.py``).

Imports neither torch nor the libraries of training: the CLI leaves them unloaded for this command.
"""

from __future__ import annotations

import argparse

from ..errors import EXIT_STATUS_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ckpt", help="list, show or verify checkpoints",
        description="Inspect checkpoints. REF: a checkpoint or run directory, wandb://ENTITY/PROJECT/NAME[:ALIAS], "
        "ENTITY/PROJECT/NAME:ALIAS, or s3:// gs:// file:// memory:// URLs (a store followed by :ALIAS, or a "
        "checkpoint folder).", epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("action", choices=["list", "show", "verify"],
                        help="list: versions/checkpoints; show: manifest and fingerprint; verify: every checksum")
    parser.add_argument("ref", help="checkpoint reference")
    return parser


def run(args: argparse.Namespace) -> int:
    from . import inspect

    print({"list": inspect.list_refs, "show": inspect.show, "verify": inspect.verify}[args.action](args.ref))
    return 0
