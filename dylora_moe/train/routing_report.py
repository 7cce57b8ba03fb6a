"""Which expert serves which dataset: per-dataset usage, mutual information, a heatmap.

For a trained mixture and held-out examples labelled with their dataset (the ``source`` column
of :func:`~dylora_moe.data.build_datasets`), every router's gate is recorded by a forward hook
(the model is not changed). Per adapted layer we count, for each dataset, how often each expert
is the top-1 choice: per token (the non-padding tokens) under token routing, per example under
per-example routing. From those counts:

* usage: for each dataset, the share of top-1 choices per expert (averaged over layers), and the
  mean gate per expert;
* prototypes: for each dataset, each layer's mean gate (``dylora export --gate dataset:NAME``);
* mutual information between dataset and top-1 expert, in bits, per layer; the report gives the
  mean and the maximum over layers. 0 means the experts do not specialise by dataset; it cannot
  exceed the entropy of the dataset mix nor ``log2(experts)`` (2 bits with 4 equally sized
  datasets and 4 experts).

``dylora report routing --model REF --datasets a,b,...`` prints the table and writes
``routing_heatmap.png`` and ``routing_report.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch


def mutual_information(counts: torch.Tensor) -> float:
    """I(row; column) in bits of a joint count table (rows: datasets, columns: experts)."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return 0.0
    joint = counts / total
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / outer[nz]).log2()).sum())


@dataclass
class RoutingTable:
    """Top-1 counts and summed gates per layer (both layers x datasets x experts)."""

    datasets: list[str]
    layers: list[str]
    num_experts: int
    granularity: str  # "token" or "example": what one count is
    counts: torch.Tensor = None  # (L, D, E)
    gate_sum: torch.Tensor = None  # (L, D, E), summed over counted units
    units: torch.Tensor = None  # (D,) counted units per dataset (per layer)

    def __post_init__(self) -> None:
        L, D, E = len(self.layers), len(self.datasets), self.num_experts
        self.counts = torch.zeros(L, D, E, dtype=torch.float64) if self.counts is None else self.counts
        self.gate_sum = torch.zeros(L, D, E, dtype=torch.float64) if self.gate_sum is None else self.gate_sum
        self.units = torch.zeros(D, dtype=torch.float64) if self.units is None else self.units

    def mi_per_layer(self) -> list[float]:
        return [mutual_information(c) for c in self.counts]

    @property
    def mi_mean(self) -> float:
        values = self.mi_per_layer()
        return sum(values) / max(len(values), 1)

    @property
    def mi_max(self) -> float:
        return max(self.mi_per_layer(), default=0.0)

    @property
    def mi_bound(self) -> float:
        """The largest possible mutual information: min(H(dataset), log2 E), in bits."""
        share = self.units / self.units.sum().clamp(min=1)
        entropy = float(-(share[share > 0] * share[share > 0].log2()).sum())
        return min(entropy, math.log2(self.num_experts))

    def usage(self) -> torch.Tensor:
        """(D, E) share of top-1 choices, averaged over layers; rows sum to 1."""
        summed = self.counts.sum(0)
        return summed / summed.sum(1, keepdim=True).clamp(min=1)

    def mean_gate(self) -> torch.Tensor:
        """(D, E) mean gate per dataset, averaged over layers."""
        return self.gate_sum.sum(0) / (self.units * len(self.layers)).clamp(min=1).unsqueeze(1)

    def prototypes(self) -> dict[str, torch.Tensor]:
        """Each dataset's prototype gate: (L, E), each layer's mean gate over the dataset's counted units
        (a dataset without any: none)."""
        means = self.gate_sum / self.units.clamp(min=1).view(1, -1, 1)
        return {name: means[:, d].float() for d, name in enumerate(self.datasets) if self.units[d] > 0}

    def to_dict(self) -> dict[str, Any]:
        return {
            "granularity": self.granularity,
            "datasets": self.datasets,
            "experts": self.num_experts,
            "units_per_dataset": {d: int(u) for d, u in zip(self.datasets, self.units.tolist())},
            "top1_usage": {d: [round(x, 4) for x in row] for d, row in zip(self.datasets, self.usage().tolist())},
            "mean_gate": {d: [round(x, 4) for x in row] for d, row in zip(self.datasets, self.mean_gate().tolist())},
            "mutual_information_bits": {"mean": self.mi_mean, "max": self.mi_max,
                                        "per_layer": dict(zip(self.layers, self.mi_per_layer()))},
            "mutual_information_bound_bits": self.mi_bound,
        }

    def summary(self) -> str:
        width = max(len("dataset"), *(len(d) for d in self.datasets))
        head = f"{'dataset':<{width}}  " + "  ".join(f"{'e' + str(e):>6}" for e in range(self.num_experts))
        lines = [f"top-1 expert share per dataset ({self.granularity} routing, averaged over "
                 f"{len(self.layers)} adapted layers); mean gate in brackets", head]
        for d, name in enumerate(self.datasets):
            cells = "  ".join(f"{u:6.3f}" for u in self.usage()[d].tolist())
            gates = " ".join(f"{g:.2f}" for g in self.mean_gate()[d].tolist())
            lines.append(f"{name:<{width}}  {cells}   [{gates}]")
        lines.append(f"mutual information dataset ; top-1 expert: mean {self.mi_mean:.3f} bits, "
                     f"max {self.mi_max:.3f} bits over layers (at most {self.mi_bound:.3f} here)")
        return "\n".join(lines)


@torch.no_grad()
def collect_routing(model, batches: Iterable[tuple[dict[str, torch.Tensor], list[str]]],
                    datasets: list[str]) -> RoutingTable:
    """Run ``model`` (a :class:`~dylora_moe.model.DyLoRAMoE`) over ``(batch, sources)`` pairs,
    counting every router's top-1 choice per dataset. ``batch`` holds input_ids, attention_mask
    and labels (labels tell the prompt apart for per-example routing)."""
    layers = [(name, layer.router) for name, layer in model.adapted_layers()]
    granularity = getattr(model.config, "routing", "token")
    table = RoutingTable(datasets, [n for n, _ in layers], model.num_experts, granularity)
    index = {d: i for i, d in enumerate(datasets)}
    captured: list[torch.Tensor] = []
    hooks = [router.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
             for _, router in layers]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for batch, sources in batches:
            captured.clear()
            batch = {k: v.to(device) for k, v in batch.items()}
            model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch.get("labels"))
            rows = torch.tensor([index[s] for s in sources])
            mask = batch["attention_mask"].bool().cpu()
            for layer_i, gate in enumerate(captured):
                gate = gate.float().cpu()
                if gate.shape[1] == 1:  # one gate per example
                    unit_gate, unit_rows = gate[:, 0], rows
                else:
                    unit_gate, unit_rows = gate[mask], rows.unsqueeze(1).expand_as(mask)[mask]
                top1 = unit_gate.argmax(-1)
                flat = unit_rows * table.num_experts + top1
                table.counts[layer_i] += torch.bincount(flat, minlength=len(datasets) * table.num_experts
                                                        ).view(len(datasets), -1).double()
                table.gate_sum[layer_i].index_add_(0, unit_rows, unit_gate.double())
                if layer_i == 0:
                    table.units += torch.bincount(unit_rows, minlength=len(datasets)).double()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return table


def plot_heatmap(table: RoutingTable, path: Path) -> Path:
    """Datasets x experts heatmap of the top-1 share, with the numbers in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usage = table.usage().numpy()
    fig, ax = plt.subplots(figsize=(1.2 * table.num_experts + 3, 0.6 * len(table.datasets) + 1.8), dpi=100)
    image = ax.imshow(usage, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(table.num_experts), [f"expert {e}" for e in range(table.num_experts)])
    ax.set_yticks(range(len(table.datasets)), table.datasets)
    for d in range(len(table.datasets)):
        for e in range(table.num_experts):
            ax.text(e, d, f"{usage[d, e]:.2f}", ha="center", va="center",
                    color="black" if usage[d, e] > 0.5 else "white", fontsize=9)
    ax.set_title(f"top-1 expert share per dataset ({table.granularity} routing)\n"
                 f"MI mean {table.mi_mean:.2f} bits, max {table.mi_max:.2f} bits", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def eval_batches(eval_data, collator, batch_size: int):
    """(padded batch, sources) pairs over a tokenised dataset with a ``source`` column, in order."""
    for start in range(0, len(eval_data), batch_size):
        rows = eval_data.select(range(start, min(start + batch_size, len(eval_data))))
        examples = [dict(zip(rows.column_names, values)) for values in zip(*(rows[c] for c in rows.column_names))]
        yield collator(examples), list(rows["source"])


def write_report(table: RoutingTable, out_dir: Path) -> tuple[Path, Path]:
    """``routing_report.json`` and ``routing_heatmap.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "routing_report.json"
    json_path.write_text(json.dumps(table.to_dict(), indent=2) + "\n")
    return json_path, plot_heatmap(table, out_dir / "routing_heatmap.png")


def write_run_routing_report(model, eval_data, collator, out_dir: Path, batch_size: int) -> RoutingTable | None:
    """At the end of a training run on several datasets: the report over its held-out split."""
    names = list(dict.fromkeys(eval_data["source"])) if len(eval_data) else []
    if len(names) < 2:
        return None
    table = collect_routing(model, eval_batches(eval_data, collator, batch_size), names)
    write_report(table, Path(out_dir))
    return table


def _training_default(name: str):
    from .config import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


def training_config(model_ref: str, checkpoint: Path | None) -> dict[str, Any] | None:
    """The training config of the run ``model_ref`` comes from: a fetched checkpoint's manifest, or for a
    run's ``final/`` directory the manifest of the run's newest checkpoint; None when there is none."""
    from ..checkpoint.directory import latest_checkpoint
    from ..checkpoint.format import read_manifest

    if checkpoint is None:
        checkpoints = Path(model_ref).parent / "checkpoints"
        checkpoint = latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
    if checkpoint is None:
        return None
    try:
        return read_manifest(checkpoint).training_config or None
    except Exception:  # noqa: BLE001 - a damaged manifest only loses the defaults it would give
        return None


@dataclass
class HeldOut:
    """Which held-out prompts to route, as the run split them: flags, else the run's training config, else
    training's defaults (so a report or a prototype sees the split and lengths the run saw)."""

    datasets: str | None = None
    data_dir: str | None = None
    max_seq_length: int | None = None
    validation_fraction: float | None = None
    eval_subset: float | None = None
    seed: int | None = None
    batch_size: int = 8

    def completed(self, trained: dict[str, Any] | None) -> "HeldOut":
        trained = trained or {}

        def pick(name: str, default):
            given = getattr(self, name)
            return given if given is not None else trained.get(name) if trained.get(name) is not None else default

        return HeldOut(
            datasets=pick("datasets", None),
            data_dir=self.data_dir or os.environ.get("DYLORA_DATA_DIR") or trained.get("data_dir") or None,
            max_seq_length=pick("max_seq_length", _training_default("max_seq_length")),
            validation_fraction=pick("validation_fraction", _training_default("validation_fraction")),
            eval_subset=pick("eval_subset", _training_default("eval_subset")),
            seed=pick("seed", _training_default("seed")),
            batch_size=self.batch_size)


def held_out_routing(model, tokenizer, datasets: str | list[str], *, data_dir: str | None = None,
                     max_seq_length: int = 256, validation_fraction: float = 0.05, eval_subset: float = 100.0,
                     batch_size: int = 16, seed: int = 42) -> RoutingTable:
    """Route the held-out split of each dataset (as training split it: same fraction and seed) through
    ``model``; the table lists the datasets that have held-out examples, in the order given."""
    from ..data import PaddingCollator, build_datasets
    from ..data.mixing import split_weighted_names
    from ..errors import ConfigError

    names = split_weighted_names(datasets)[0] if isinstance(datasets, str) else list(datasets)  # weights: no matter
    # only the held-out split is used: tokenise 1% of the training splits (the split itself is unchanged)
    _, eval_data, _ = build_datasets(names, tokenizer, max_seq_length, data_dir=data_dir, seed=seed,
                                     validation_fraction=validation_fraction, training_subset=1,
                                     eval_subset=eval_subset)
    if len(eval_data) == 0:
        raise ConfigError("the held-out split is empty: raise --validation_fraction or --eval_subset.")
    present = [n for n in names if n in set(eval_data["source"])]
    batches = eval_batches(eval_data, PaddingCollator.for_tokenizer(tokenizer), batch_size)
    return collect_routing(model, batches, present)


def routing_report(model_ref: str, held_out: HeldOut, *, output_dir: str | None = None
                   ) -> tuple[RoutingTable, Path, Path]:
    """Load a trained mixture (a saved directory or a checkpoint reference), route the held-out split of
    its datasets as the run made it (``HeldOut``: flags, else the run's config), write the report (by
    default beside a saved mixture; a checkpoint is never written into)."""
    import tempfile

    from ..checkpoint.references import fetch_model
    from ..errors import ConfigError
    from ..model.trained import load_trained_mixture

    with tempfile.TemporaryDirectory(prefix="dylora-report-") as downloads:  # a fetched checkpoint, loaded then removed
        checkpoint = fetch_model(model_ref, Path(downloads))
        model, tokenizer = load_trained_mixture(checkpoint or model_ref)
        held_out = held_out.completed(training_config(model_ref, checkpoint))
    if not held_out.datasets:
        raise ConfigError(f"--datasets is needed: no training configuration of the run behind --model {model_ref!r} "
                          "was found (a run's final/ reads it from the run's newest checkpoint).")
    model_dir = Path(model_ref) if checkpoint is None else Path.cwd()
    table = held_out_routing(model, tokenizer, held_out.datasets, data_dir=held_out.data_dir,
                             max_seq_length=held_out.max_seq_length, validation_fraction=held_out.validation_fraction,
                             eval_subset=held_out.eval_subset, batch_size=held_out.batch_size, seed=held_out.seed)
    json_path, png = write_report(table, Path(output_dir) if output_dir else model_dir)
    return table, json_path, png
