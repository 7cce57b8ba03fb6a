"""The flags of ``dylora export`` and ``dylora merge`` (nothing heavy is imported until ``run``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import EXIT_STATUS_HELP

GATE_HELP = ("the fixed gate: expert:N (one expert), uniform (an even share of every expert), dataset:NAME (a "
             "prototype: each layer's mean router gate over NAME's held-out prompts), dataset:all (export: one "
             "prototype adapter per training dataset, in OUT/NAME) or FILE.json (per-layer gates: one gate of E "
             "numbers, a list of one per adapted layer, or {layer name: gate}, as dylora_gate.json holds them)")


def common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="REF", help="a trained mixture: a run's final/ directory "
                        "(runs/RUN_ID/final) or a checkpoint reference, as for dylora ckpt (fetched and verified)")
    parser.add_argument("--gate", required=True, metavar="G", help=GATE_HELP)
    parser.add_argument("--out", required=True, metavar="DIR", help="the directory to write (new or empty; written "
                        "whole or not at all)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    held_out = parser.add_argument_group(
        "dataset prototypes", "where dataset:NAME and dataset:all find the held-out prompts; by default as the run "
        "split them (its training config: a checkpoint's manifest, or the run's newest checkpoint for runs/ID/final)")
    held_out.add_argument("--datasets", metavar="A,B,...", default=None,
                          help="the training datasets (needed by dataset:all when the run's config is not found)")
    held_out.add_argument("--data_dir", metavar="DIR", default=None,
                          help="offline directory serving named datasets (env DYLORA_DATA_DIR)")
    held_out.add_argument("--max_seq_length", type=int, default=None, metavar="N", help="default: the run's, else 512")
    held_out.add_argument("--validation_fraction", type=float, default=None, metavar="X",
                          help="held-out share of each dataset (default: the run's, else 0.05)")
    held_out.add_argument("--eval_subset", type=float, default=None, metavar="X",
                          help="percent of each held-out split (default: the run's, else 100)")
    held_out.add_argument("--seed", type=int, default=None, metavar="N",
                          help="the seed that chose the held-out split (default: the run's, else 42)")
    held_out.add_argument("--batch_size", type=int, default=8, metavar="N",
                          help="prompts per forward pass (default: 8)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``dylora export`` (``merge_command.py`` registers ``dylora merge`` with the same options)."""
    export = subparsers.add_parser(
        "export", help="a trained mixture under a fixed gate as a standard PEFT LoRA adapter",
        description="Write the mixture under a fixed gate as one standard PEFT LoRA adapter (adapter_config.json, "
        "adapter_model.safetensors), loadable by PeftModel.from_pretrained and by vLLM/SGLang/LoRAX multi-LoRA "
        "serving: the experts' A stacked and each B scaled by its gate, rank (shared + kept experts) x r. It equals "
        "the mixture with that gate forced; under per-example routing, exactly the mixture for a prompt whose router "
        "gate it is. See docs/export.md.", epilog=EXIT_STATUS_HELP)
    common_options(export)
    export.add_argument("--keep_unused_experts", action="store_true",
                        help="keep experts whose gate is 0 in every layer (default: leave them out, a smaller rank)")
    return export


def run(args: argparse.Namespace) -> int:
    from ..model.gates import parse_gate_spec
    from .gated import HeldOut, export, merge

    spec = parse_gate_spec(args.gate)
    held_out = HeldOut(datasets=args.datasets, data_dir=args.data_dir, max_seq_length=args.max_seq_length,
                       validation_fraction=args.validation_fraction, eval_subset=args.eval_subset, seed=args.seed,
                       batch_size=args.batch_size)
    if args.command == "merge":  # merge_command.py
        print(merge(args.model, spec, args.out, held_out, overwrite=args.overwrite))
    else:
        for line in export(args.model, spec, args.out, held_out, overwrite=args.overwrite,
                           keep_unused=args.keep_unused_experts):
            print(line)
    return 0
