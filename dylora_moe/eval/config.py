"""``dylora eval`` options: one dataclass that holds their defaults, the one place they are validated, and
the one place that fills it from the flags (which ``command.py`` defines)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConfigError
from .benchmarks import check_benchmarks
from .sandbox import ISOLATION_MODES, SandboxLimits

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
    memory_mb: int = SandboxLimits.memory_mb
    max_processes: int = SandboxLimits.max_processes
    max_program_kb: int = SandboxLimits.max_program_kb
    workers: int | None = None
    isolation: str = "auto"
    threads: int | None = None
    report_to: str = "auto"
    wandb_project: str = "dylora-moe"
    progress: bool = True

    def sandbox_limits(self) -> SandboxLimits:
        return SandboxLimits(timeout_s=self.timeout or SandboxLimits.timeout_s, memory_mb=self.memory_mb,
                             max_processes=self.max_processes, max_program_kb=self.max_program_kb)

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


def default_of(name: str):
    """The default of option ``name`` (what --help shows)."""
    f = EvalConfig.__dataclass_fields__[name]
    return f.default if f.default is not MISSING else f.default_factory()


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Flags not given are None (see ``command.py``): they keep EvalConfig's defaults."""
    values = {f.name: getattr(args, f.name) for f in fields(EvalConfig) if getattr(args, f.name, None) is not None}
    return EvalConfig(**values).validate()
