"""Fixed gates: how much each expert weighs in each adapted layer, the same for every request.

A mixture under a fixed gate is one ordinary LoRA (``export.export_gated``). Gates are a
(adapted layers x experts) tensor, row i for the i-th of ``model.adapted_layers()``; they are the
router's output (after top-k and renormalising), before the shared experts' fixed share.

A gate specification, as ``dylora export --gate`` and ``dylora merge --gate`` take it:

``expert:N``      all of expert N in every layer (today's one-expert export)
``uniform``       an even share of every (admitted) expert
``dataset:NAME``  a prototype: the mean of each layer's router gate over NAME's held-out prompts.
                  It needs the data, so it is computed above the model (``train.routing_report``)
``dataset:all``   one prototype per dataset the mixture was trained on
``FILE.json``     per-layer gates: ``{"gates": ...}`` or the bare value, where the value is one gate
                  of E numbers (every layer), a list of one gate per adapted layer, or an object
                  from each adapted layer's name to its gate (what an export writes in
                  ``dylora_gate.json``, so an export's gates can be given again)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

ACCEPTED = ("expert:N (an expert index), uniform, dataset:NAME (the mean gate over a dataset's held-out prompts), "
            "dataset:all (one per training dataset) or a JSON file of per-layer gates")


@dataclass(frozen=True)
class GateSpec:
    """A parsed ``--gate``: ``kind`` is ``expert``, ``uniform``, ``dataset`` or ``file``."""

    text: str
    kind: str
    value: int | str | None = None

    @property
    def is_dataset(self) -> bool:
        return self.kind == "dataset"


def parse_gate_spec(text: str, flag: str = "--gate") -> GateSpec:
    """The syntax of a gate specification (its values are checked against a model by :func:`fixed_gates`)."""
    text = (text or "").strip()
    head, sep, rest = text.partition(":")
    if text == "uniform":
        return GateSpec(text, "uniform")
    if sep and head == "expert":
        try:
            return GateSpec(text, "expert", int(rest))
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: the expert index {rest!r} is not an integer; "
                              f"accepted: {ACCEPTED}.") from None
    if sep and head == "dataset":
        if not rest.strip():
            raise ConfigError(f"{flag} {text!r} names no dataset; accepted: {ACCEPTED}.")
        return GateSpec(text, "dataset", rest.strip())
    if text.endswith(".json") or Path(text).is_file():
        return GateSpec(text, "file", text)
    raise ConfigError(f"{flag} {text!r} is not a gate; accepted: {ACCEPTED}.")


def expert_gates(model, expert: int) -> torch.Tensor:
    """Every layer's gate all on ``expert``."""
    if not 0 <= expert < model.num_experts:
        raise ConfigError(f"expert index {expert} is out of range: the mixture has {model.num_experts} experts "
                          f"(expert:0 to expert:{model.num_experts - 1}).")
    gates = torch.zeros(len(model.adapted_names), model.num_experts)
    gates[:, expert] = 1.0
    return gates


def uniform_gates(model) -> torch.Tensor:
    """An even share of every admitted expert (a grown expert only as far as it is admitted), in every layer."""
    admission = model.routing.admission
    share = admission.float() if admission is not None else torch.ones(model.num_experts)
    return (share / share.sum()).expand(len(model.adapted_names), -1).clone()


def read_gates_file(model, path: str | Path, flag: str = "--gate") -> torch.Tensor:
    """Per-layer gates from a JSON file (see the module docstring for its forms)."""
    names, E = list(model.adapted_names), model.num_experts
    accepted = (f"accepted: {{\"gates\": G}} or G itself, where G is one gate of {E} numbers (every layer), a list of "
                f"{len(names)} such gates (one per adapted layer) or an object from each adapted layer's name "
                "to its gate")
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{flag} {str(path)!r}: no such gates file; {ACCEPTED}.") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {str(path)!r} is not a readable JSON gates file ({e}); {accepted}.") from None
    if isinstance(data, dict) and "gates" in data:
        data = data["gates"]
    if isinstance(data, dict):
        unknown, missing = sorted(set(data) - set(names)), [n for n in names if n not in data]
        if unknown or missing:
            raise ConfigError(f"{flag} {str(path)!r} does not name this mixture's adapted layers: unknown "
                              f"{unknown[:3]}, missing {missing[:3]} (the layers are {names[0]} ... {names[-1]}); "
                              f"{accepted}.")
        data = [data[n] for n in names]
    if isinstance(data, list) and data and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
        data = [data] * len(names)
    rows_ok = isinstance(data, list) and len(data) == len(names) and all(
        isinstance(row, list) and len(row) == E and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        for x in row) for row in data)
    if not rows_ok:
        raise ConfigError(f"{flag} {str(path)!r} has gates of the wrong shape for this mixture ({len(names)} adapted "
                          f"layers x {E} experts); {accepted}.")
    if not all(math.isfinite(x) and x >= 0 for row in data for x in row):
        raise ConfigError(f"{flag} {str(path)!r}: every gate value must be a finite number >= 0.")
    return torch.tensor(data, dtype=torch.float32)


def fixed_gates(model, spec: GateSpec) -> torch.Tensor:
    """The gates of an ``expert``, ``uniform`` or ``file`` specification for ``model`` (a dataset
    prototype needs data: ``train.routing_report`` computes it)."""
    if spec.kind == "expert":
        return expert_gates(model, spec.value)
    if spec.kind == "uniform":
        return uniform_gates(model)
    if spec.kind == "file":
        return read_gates_file(model, spec.value)
    raise ConfigError(f"--gate {spec.text!r} needs the data: a dataset prototype is computed from held-out prompts.")
