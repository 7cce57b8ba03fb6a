"""End-of-run artefacts: the summary (JSON + text) and the routing picture (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
