"""``dylora ckpt list | show | verify REF``: checkpoints as the store holds them (``inspect.py``).

Imports neither torch nor the libraries of training: the CLI leaves them unloaded for this command.
"""

from __future__ import annotations

import argparse

from ..errors import EXIT_STATUS_HELP

REF_HELP = ("a checkpoint reference: a checkpoint, run or checkpoints directory; DIR:ALIAS of a local store "
            "(runs/RUN_ID/store:latest); wandb://ENTITY/PROJECT/NAME[:ALIAS]; an s3:// gs:// file:// store URL "
            "followed by :ALIAS, or a checkpoint folder URL")
ACTIONS = {
    "list": ("versions and aliases in a store, or the checkpoints of a run directory",
             "List what REF holds: a store's versions with their aliases and steps, or a run directory's local "
             "checkpoints (with DIR:ALIAS the whole store is listed)."),
    "show": ("the manifest: step, files, fingerprint, training configuration",
             "Show one checkpoint's manifest: its step and epoch, every file with size and SHA-256, the architecture "
             "fingerprint and the training configuration. Fetches a stored checkpoint first."),
    "verify": ("check every file against the manifest's SHA-256",
               "Verify one checkpoint: every file's size and SHA-256 against its manifest (a stored one is fetched "
               "first). Exit status 0 when intact, 1 naming the damaged file."),
}


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
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (short, description) in ACTIONS.items():
        action = actions.add_parser(name, help=short, description=description, epilog=EXIT_STATUS_HELP)
        action.add_argument("ref", metavar="REF", help=REF_HELP)
    return parser


def run(args: argparse.Namespace) -> int:
    from . import inspect

    print({"list": inspect.list_refs, "show": inspect.show, "verify": inspect.verify}[args.action](args.ref))
    return 0
