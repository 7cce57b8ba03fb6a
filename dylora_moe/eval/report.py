"""What an evaluation leaves behind: ``results.jsonl``, ``summary.json``, ``summary.txt``, W&B.

``results.jsonl`` has one line per executed sample (model, benchmark, task, sample, passed,
outcome, seconds, the error's last line, the completion). The summary table puts the models side
by side per benchmark and metric, with the difference when a baseline was scored, then each
model's outcome counts and, for a mixture, the share of routed tokens each expert took.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from .scoring import BenchmarkScore, SampleResult

log = logging.getLogger(__name__)


def write_results(path: Path, results: list[SampleResult]) -> None:
    with open(path, "a") as f:
        for r in results:
            f.write(json.dumps(asdict(r)) + "\n")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def summary_table(scores: list[BenchmarkScore], models: list[str], sandbox: str) -> str:
    """Models side by side; with two models (baseline first) a difference column."""
    header = ["benchmark", "tasks", "n", "metric", *models] + (["difference"] if len(models) == 2 else [])
    rows = []
    for benchmark in dict.fromkeys(s.benchmark for s in scores):
        by_model = {s.model: s for s in scores if s.benchmark == benchmark}
        first = by_model[models[0]] if models[0] in by_model else next(iter(by_model.values()))
        n = first.samples // first.tasks if first.tasks and first.samples % first.tasks == 0 else "var"
        for metric in first.pass_at_k:
            values = [by_model[m].pass_at_k.get(metric) if m in by_model else None for m in models]
            row = [benchmark, str(first.tasks), str(n), metric, *map(_pct, values)]
            if len(models) == 2:
                row.append("n/a" if None in values else f"{100 * (values[1] - values[0]):+.2f} pts")
            rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.append("")
    for s in scores:
        counts = ", ".join(f"{k} {v}" for k, v in s.outcomes.items() if v)
        lines.append(f"{s.model} on {s.benchmark}: {s.samples} samples ({counts}); timeout {s.timeout_s:g} s")
        if s.expert_usage:
            usage = ", ".join(f"e{i} {100 * u:.1f}%" for i, u in enumerate(s.expert_usage))
            lines.append(f"  experts used (share of routed tokens): {usage}")
    lines.append(f"sandbox: {sandbox}")
    return "\n".join(lines)


def write_summary(out: Path, scores: list[BenchmarkScore], models: list[str], sandbox: str, extra: dict) -> str:
    text = summary_table(scores, models, sandbox)
    (out / "summary.txt").write_text(text + "\n")
    summary = {"models": models, "sandbox": sandbox, **extra,
               "scores": [{k: v for k, v in asdict(s).items() if k != "per_task"} for s in scores],
               "per_task": {f"{s.model}|{s.benchmark}": s.per_task for s in scores}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return text


def metrics_of(scores: list[BenchmarkScore], prefix: str = "eval") -> dict[str, float]:
    """Flat metrics for a tracker: ``eval/<model>/<benchmark>/pass@k`` and outcome shares."""
    metrics = {}
    for s in scores:
        base = f"{prefix}/{s.model}/{s.benchmark}" if s.model else f"{prefix}/{s.benchmark}"
        metrics.update({f"{base}/{m}": v for m, v in s.pass_at_k.items() if v is not None})
        if s.samples:
            metrics.update({f"{base}/{o}_rate": c / s.samples for o, c in s.outcomes.items()})
    return metrics


def log_to_wandb(project: str, config: dict, scores: list[BenchmarkScore], results_path: Path, text: str) -> str:
    """One W&B run (job type ``eval``) with the metrics, the summary and the per-sample results table."""
    import wandb

    run = wandb.init(project=project, job_type="eval", config=config, reinit="finish_previous")
    try:
        run.summary.update(metrics_of(scores))
        columns = ["model", "benchmark", "task_id", "sample", "passed", "outcome", "seconds", "detail", "completion"]
        table = wandb.Table(columns=columns)
        with open(results_path) as f:
            for line in f:
                row = json.loads(line)
                table.add_data(*[row[c] for c in columns])
        run.log({"eval/results": table, "eval/summary": wandb.Html(f"<pre>{text}</pre>")})
        return run.id
    finally:
        run.finish()
