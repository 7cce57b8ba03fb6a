"""From ``--model REF --gate G`` to the directories ``dylora export`` and ``dylora merge`` write.

A dataset prototype (``dataset:NAME``) is each layer's mean router gate over NAME's held-out prompts,
routed by the routing report's machinery (``train.routing_report.held_out_routing``) with the split
the run made: its fraction, seed and sequence length come from the run's training config (a
checkpoint's manifest, or the newest checkpoint of the run a ``final/`` directory belongs to) unless
flags give them. ``dataset:all`` takes the run's datasets from that config, or from ``--datasets``.

Nothing is written to ``--out`` unless everything succeeds: the files are written into a hidden
directory beside it, which is then renamed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..model.gates import GateSpec, fixed_gates
from ..train.routing_report import HeldOut, training_config


@dataclass
class Gated:
    """One adapter to write: ``gates`` (layers x experts), what they are (``dataset:mbpp``) and the
    sub-directory of ``--out`` it goes into (None: ``--out`` itself)."""

    gates: torch.Tensor
    description: str
    subdirectory: str | None = None


def check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    """``--out``: a new or empty directory, or any with ``--overwrite`` (checked before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file: give a directory to create.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {str(out)!r} exists and is not empty: choose a new directory, or pass --overwrite "
                          "to replace it.")
    return out


def write_directory(out: Path, fill: Callable[[Path], Any]) -> None:
    """Run ``fill`` on a hidden directory beside ``out`` and rename it to ``out`` when it succeeds (an
    existing ``out`` is replaced then); on failure nothing of it is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        fill(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def dataset_prototypes(model, tokenizer, spec: GateSpec, held_out: HeldOut) -> list[Gated]:
    """The prototype(s) ``dataset:NAME`` or ``dataset:all`` asks for: each layer's mean gate over the
    dataset's held-out prompts."""
    from ..data.mixing import split_weighted_names
    from ..train.routing_report import held_out_routing

    run_datasets = split_weighted_names(held_out.datasets)[0] if held_out.datasets else None
    if spec.value == "all":
        if not run_datasets:
            raise ConfigError(f"--gate {spec.text!r}: the datasets the mixture was trained on are not known "
                              "(no training "
                              "config: the model is neither a checkpoint nor a run's final/ directory beside its "
                              "checkpoints); name them with --datasets A,B,...")
        names = run_datasets
    else:
        if run_datasets and spec.value not in run_datasets:
            raise ConfigError(f"--gate {spec.text!r}: {spec.value!r} is not one of the datasets the mixture was "
                              f"trained on ({', '.join(run_datasets)}); accepted: dataset:NAME with one of them, "
                              "or dataset:all.")
        names = [spec.value]
    table = held_out_routing(model, tokenizer, names, data_dir=held_out.data_dir,
                             max_seq_length=held_out.max_seq_length, validation_fraction=held_out.validation_fraction,
                             eval_subset=held_out.eval_subset, batch_size=held_out.batch_size, seed=held_out.seed)
    prototypes = table.prototypes()
    missing = [n for n in names if n not in prototypes]
    if missing:
        raise ConfigError(f"--gate {spec.text!r}: the held-out split has no example of {', '.join(missing)}: raise "
                          "--validation_fraction or --eval_subset.")
    several = spec.value == "all"
    return [Gated(prototypes[n], f"dataset:{n}", _safe_name(n) if several else None) for n in names]


def _safe_name(name: str) -> str:
    """A dataset name (or file path) as a directory name."""
    stem = Path(name).stem if ("/" in name or name.endswith((".json", ".jsonl", ".parquet"))) else name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "dataset"


def resolve_gates(model, tokenizer, spec: GateSpec, held_out: HeldOut) -> list[Gated]:
    if spec.is_dataset:
        return dataset_prototypes(model, tokenizer, spec, held_out)
    return [Gated(fixed_gates(model, spec), spec.text)]


def load(model_ref: str):
    """(mixture, tokenizer, training config or None) of ``--model REF``."""
    from ..checkpoint.references import fetch_model
    from ..model.trained import load_trained_mixture

    with tempfile.TemporaryDirectory(prefix="dylora-export-") as downloads:  # a fetched checkpoint, loaded then removed
        checkpoint = fetch_model(model_ref, Path(downloads))
        model, tokenizer = load_trained_mixture(checkpoint or model_ref)
        trained = training_config(model_ref, checkpoint)
    return model, tokenizer, trained


def describe(directory: Path, model, gated: Gated) -> str:
    import json

    from ..model.export import GATES_NAME

    record = json.loads((directory / GATES_NAME).read_text())
    return (f"{gated.description}: rank {record['rank']} ({model.config.shared_experts} shared + "
            f"{len(record['experts_kept'])} routed experts {record['experts_kept']} x r={model.config.r})")


def export(model_ref: str, spec: GateSpec, out: str, held_out: HeldOut, *, overwrite: bool = False,
           keep_unused: bool = False) -> list[str]:
    """``dylora export``: one PEFT adapter in ``out`` (``dataset:all``: one per dataset, in ``out/NAME``).
    Returns one line per adapter written."""
    out_dir = check_out(out, overwrite)
    model, tokenizer, trained = load(model_ref)
    if model.config.routing != "example":
        print("dylora export: note: this mixture routes every token on its own; the adapter equals it with this "
              "gate forced on every token, not its own routing.", file=sys.stderr)
    adapters = resolve_gates(model, tokenizer, spec, held_out.completed(trained))
    lines = []

    def fill(staging: Path) -> None:
        for gated in adapters:
            directory = staging / gated.subdirectory if gated.subdirectory else staging
            model.export_gated(gated.gates, directory, drop_unused=not keep_unused, description=gated.description)
            lines.append(f"{describe(directory, model, gated)} -> {out_dir / (gated.subdirectory or '')}".rstrip("/"))

    write_directory(out_dir, fill)
    return lines


def merge(model_ref: str, spec: GateSpec, out: str, held_out: HeldOut, *, overwrite: bool = False) -> str:
    """``dylora merge``: the base model with the mixture under ``spec``'s gate merged into its weights,
    with the tokenizer, a plain Hugging Face model directory in ``out``."""
    from ..model.export import GATES_NAME, check_mergeable, merge_adapter

    if spec.is_dataset and spec.value == "all":
        raise ConfigError("--gate 'dataset:all' writes one adapter per dataset, which merge cannot do in one model: "
                          "merge one prototype at a time (--gate dataset:NAME), or use dylora export.")
    out_dir = check_out(out, overwrite)
    model, tokenizer, trained = load(model_ref)
    check_mergeable(model)
    (gated,) = resolve_gates(model, tokenizer, spec, held_out.completed(trained))
    summary = []

    def fill(staging: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="dylora-merge-") as adapter_dir:
            adapter = model.export_gated(gated.gates, adapter_dir, description=gated.description)
            summary.append(describe(adapter, model, gated))
            gates_record = (adapter / GATES_NAME).read_text()
            merged = merge_adapter(model, adapter)
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / GATES_NAME).write_text(gates_record)

    write_directory(out_dir, fill)
    return f"{summary[0]} merged into {model.config.base_model_name_or_path} -> {out_dir}"
