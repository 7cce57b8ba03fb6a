"""``dylora report routing``: which expert serves which dataset in a trained mixture (``routing_report.py``)."""

from __future__ import annotations

import argparse

from ..errors import EXIT_STATUS_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    report = subparsers.add_parser(
        "report", help="reports on a trained mixture (routing: which expert serves which dataset)",
        epilog=EXIT_STATUS_HELP)
    reports = report.add_subparsers(dest="report", metavar="REPORT", required=True)
    routing = reports.add_parser(
        "routing", help="per-dataset expert usage, mutual information and a heatmap",
        description="Route the held-out split of each dataset through a trained mixture and report, per dataset, "
        "the share of top-1 choices per expert and the mean gate, the mutual information between dataset and "
        "top-1 expert (bits, per adapted layer: mean and max), and a datasets x experts heatmap. Writes "
        "routing_report.json and routing_heatmap.png (in --output_dir, default the model directory). The datasets, "
        "their held-out split and the sequence length are the run's own (from its training configuration: a "
        "checkpoint's manifest, or for runs/RUN_ID/final its newest checkpoint), so the report is the one training "
        "wrote; flags override them.",
        epilog=EXIT_STATUS_HELP)
    routing.add_argument("--model", required=True, metavar="REF",
                         help="a trained mixture: runs/RUN_ID/final or a checkpoint reference, as for dylora ckpt "
                         "(fetched and verified)")
    routing.add_argument("--datasets", metavar="A,B,...", default=None,
                         help="comma-separated dataset names or files, as for train (default: the run's)")
    routing.add_argument("--data_dir", metavar="DIR", default=None,
                         help="offline directory serving named datasets (default: env DYLORA_DATA_DIR, else the run's)")
    routing.add_argument("--output_dir", metavar="DIR", default=None,
                         help="where to write the report (default: the mixture directory; for a checkpoint "
                         "reference, the current directory)")
    routing.add_argument("--max_seq_length", type=int, default=None, metavar="N",
                         help="longest tokenised example (default: the run's)")
    routing.add_argument("--validation_fraction", type=float, default=None, metavar="X",
                         help="held-out share of each dataset (default: the run's)")
    routing.add_argument("--eval_subset", type=float, default=None, metavar="X",
                         help="percent of each held-out split (default: the run's)")
    routing.add_argument("--seed", type=int, default=None, metavar="N",
                         help="the seed that chose the held-out split (default: the run's)")
    return report


def run(args: argparse.Namespace) -> int:
    from .routing_report import HeldOut, routing_report

    held_out = HeldOut(datasets=args.datasets, data_dir=args.data_dir, max_seq_length=args.max_seq_length,
                       validation_fraction=args.validation_fraction, eval_subset=args.eval_subset, seed=args.seed,
                       batch_size=16)
    table, json_path, png = routing_report(args.model, held_out, output_dir=args.output_dir)
    print(table.summary())
    print(f"wrote {json_path} and {png}")
    return 0
