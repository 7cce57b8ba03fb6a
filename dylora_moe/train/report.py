"""End-of-run artefacts: the summary (JSON + text), the routing picture (PNG) and, with several
datasets, the routing report (which dataset each expert serves).

Rank 0 writes them once the model is final; nothing here knows the trainer: it is given the run's
pieces.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .state import TrainerState

if TYPE_CHECKING:
    from .batch_plan import BatchPlan

log = logging.getLogger(__name__)


def end_of_run_reports(history: list[dict[str, Any]], model, eval_data, collator, run_dir: Path, eval_batch_size: int,
                       maturity_step: int | None, sharded: bool) -> dict[str, Any]:
    """Reports written into the run directory; their paths and headline numbers go into the summary."""
    from .routing_report import write_run_routing_report

    png = plot_routing(history, model.num_experts, run_dir / "routing.png", maturity_step)
    loss_png = plot_loss(history, run_dir / "loss.png")
    routing = None
    if sharded:  # its forward passes would need every rank; the final model can be reported on
        log.info("routing report: not written under --fsdp; run `dylora report routing --model %s`", run_dir / "final")
    else:  # several datasets: who serves whom
        routing = write_run_routing_report(model, eval_data, collator, run_dir, eval_batch_size)
    return {"routing_png": str(png) if png else None, "loss_png": str(loss_png) if loss_png else None,
            "routing_mutual_information_bits": routing.mi_mean if routing is not None else None}


def run_summary(run_id: str, state: TrainerState, *, stop_reason: str | None, final_loss: float, steps_per_epoch: int,
                plan: "BatchPlan", num_experts: int, train_data, eval_data, data_report, rank0_batches: list[list[int]],
                model_dir: Path, reports: dict[str, Any], unpublished: list[Path]) -> dict[str, Any]:
    """What ``summary.json`` holds: the run's outcome, its throughput, its data and where its outputs are."""
    from ..data import padding_waste

    st = state
    return {
        "run_id": run_id,
        "steps": st.global_step,
        "epochs": st.global_step / max(steps_per_epoch, 1),
        "stop_reason": stop_reason,
        "eval_loss_base": st.eval_loss_base,
        "eval_loss_final": final_loss,
        "eval_loss_best": st.best_eval_loss,
        "best_step": st.best_step,
        "train_time_s": st.train_time_s,
        "tokens_seen": st.tokens_seen,
        "tokens_per_s": st.tokens_seen / max(st.train_time_s, 1e-9),
        "padding_waste": padding_waste(train_data["length"], rank0_batches),
        "maturity_step": st.maturity_step,
        "num_experts": num_experts,
        "world_size": plan.world_size,
        "global_batch": plan.global_batch,
        "train_examples": len(train_data),
        "eval_examples": len(eval_data),
        "model_dir": str(model_dir),
        **reports,
        "unpublished_checkpoints": [str(p) for p in unpublished],
        "data": data_report.to_dict(),
    }


def plot_routing(history: list[dict[str, Any]], num_experts: int, path: Path, maturity_step: int | None) -> Path | None:
    """Stacked per-expert usage over training steps, with the dense -> top-k switch marked."""
    rows = [h for h in history if "routing/usage_0" in h]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in rows]
    usage = [[h.get(f"routing/usage_{e}", 0.0) for h in rows] for e in range(num_experts)]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.stackplot(steps, usage, labels=[f"expert {e}" for e in range(num_experts)], alpha=0.85)
    if maturity_step is not None:
        ax.axvline(maturity_step, color="black", linestyle="--", linewidth=1)
        ax.text(maturity_step, 0.98, " all mature: top-k", fontsize=8, va="top")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share of token assignments")
    ax.set_ylim(0, 1)
    ax.set_title("Per-expert usage over training")
    ax.legend(loc="lower left", fontsize=8, ncol=min(num_experts, 4))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_loss(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss per step (and its running mean) with the held-out loss at each evaluation point."""
    train = [(h["step"], h["train/lm_loss"]) for h in history if "train/lm_loss" in h]
    held_out = [(h["step"], h["eval/loss"]) for h in history if "eval/loss" in h]
    if not train and not held_out:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 20)
        if window == 1:  # few steps: the losses themselves (markers, since a short run may have one point)
            ax.plot(steps, losses, color="tab:blue", linewidth=2, marker="o" if len(steps) < 3 else None,
                    label="training loss (response tokens)")
        else:
            ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="training loss (response tokens)")
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"training loss, mean of {window} steps")
    if held_out:
        steps, losses = zip(*held_out)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("Loss over training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def next_steps(summary: dict[str, Any]) -> str:
    """The end-of-run block: what the run wrote to look at, and the commands that come next."""
    run_dir = Path(summary["model_dir"]).parent
    pictures = [p for p in (summary.get("loss_png"), summary.get("routing_png")) if p]
    lines = [f"pictures: {', '.join(pictures)}" if pictures else None,
             f"next: dylora generate --model {summary['model_dir']} \"Write a function that reverses a string.\"",
             f"      dylora eval --model {summary['model_dir']} --baseline --limit 10 --max_new_tokens 64",
             f"      dylora report routing --model {summary['model_dir']}",
             f"      tensorboard --logdir {run_dir}" if any(run_dir.rglob("events.out.tfevents*")) else None]
    return "\n".join(line for line in lines if line)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> str:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"run {summary['run_id']}: {summary['steps']} optimizer steps, {summary['epochs']:.2f} epochs, "
        f"{summary['train_time_s']:.0f} s, {summary['tokens_per_s']:.0f} tokens/s",
        f"held-out loss: base {summary['eval_loss_base']:.4f} -> trained {summary['eval_loss_final']:.4f} "
        f"(best {summary['eval_loss_best']:.4f})",
        f"padding waste {summary['padding_waste'] * 100:.1f}%, stopped: {summary['stop_reason']}",
        f"model: {summary['model_dir']}",
    ]
    text = "\n".join(lines)
    (run_dir / "summary.txt").write_text(text + "\n")
    return text
