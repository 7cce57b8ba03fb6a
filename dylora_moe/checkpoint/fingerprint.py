"""``ArchitectureFingerprint``: what a checkpoint's tensors mean, compared before any resume.

Two runs can share a checkpoint only if they agree on the base model (its config and the shapes
of its weights) and on the mixture's architecture (experts, rank, alpha, adapted modules, router
settings). Maturity is recorded for information: it is state that training changes.
Hyper-parameters outside the fingerprint (learning rate, batch size, datasets, epochs,
patience) may change between a checkpoint and its resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import DyLoRAError


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


SAMPLES_PER_TENSOR = 64


def base_weights_sample_sha(base) -> str:
    """A content hash of the frozen base weights that costs O(number of tensors), not O(bytes).

    From every frozen tensor (in name order) it takes ``SAMPLES_PER_TENSOR`` values at fixed,
    evenly spread positions of the flattened tensor, rounded to bfloat16 so that the same weights
    loaded in float32, float16 or bfloat16 hash alike. Two different pretrained bases differ at
    almost every position, so a sample suffices; it is not a defence against a deliberately forged
    base. A hub id and a local copy of the same weights give the same hash.
    """
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(base.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            continue
        flat = param.detach().reshape(-1)
        count = min(SAMPLES_PER_TENSOR, flat.numel())
        positions = torch.linspace(0, flat.numel() - 1, count, device=flat.device).round().long()
        sample = flat[positions].to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class ArchitectureFingerprint:
    base_model: str
    base_config_sha: str
    base_weight_shapes_sha: str
    num_experts: int
    r: int
    alpha: float
    target_modules: list[str]
    top_k: int
    router_temperature: float
    maturity: list[bool] = field(default_factory=list)
    routing: str = "token"  # per token or per example; checkpoints from before it routed per token
    router_scale: float = 1.0  # logits = scale * W x; checkpoints from before it used 1
    gate_floor: float = 0.0  # share of every dense gate spread evenly; checkpoints from before it had none
    shared_experts: int = 0  # experts with a fixed gate beside the routed ones; checkpoints from before it had none
    base_weights_sha: str = ""  # "" in checkpoints from before it existed: not compared then

    INFORMATIONAL = ("maturity",)

    @classmethod
    def of(cls, model) -> "ArchitectureFingerprint":
        """The fingerprint of a live :class:`~dylora_moe.model.DyLoRAMoE`."""
        base = model.base_model
        config = base.config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
            config.pop(volatile, None)
        shapes = sorted((name, list(p.shape)) for name, p in base.named_parameters() if not p.requires_grad)
        mc = model.config
        return cls(
            base_model=str(mc.base_model_name_or_path),
            base_config_sha=_sha(config),
            base_weight_shapes_sha=_sha(shapes),
            base_weights_sha=base_weights_sample_sha(base),
            num_experts=model.num_experts,
            r=mc.r,
            alpha=float(mc.alpha),
            target_modules=list(model.adapted_names),
            top_k=mc.top_k,
            router_temperature=float(mc.router_temperature),
            routing=getattr(mc, "routing", "token"),
            router_scale=float(getattr(mc, "router_scale", 1.0)),
            gate_floor=float(getattr(mc, "gate_floor", 0.0)),
            shared_experts=int(getattr(mc, "shared_experts", 0)),
            maturity=[bool(m) for m in model.routing.mature],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchitectureFingerprint":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def differences(self, requested: "ArchitectureFingerprint",
                    grow_experts: bool = False) -> list[tuple[str, Any, Any]]:
        """(field, checkpoint value, requested value) for every field that forbids the resume."""
        diffs = []
        for name in self.__dataclass_fields__:
            if name in self.INFORMATIONAL or name == "base_model":
                continue
            ours, theirs = getattr(self, name), getattr(requested, name)
            if name == "num_experts" and grow_experts and theirs >= ours:
                continue
            if name == "base_weights_sha" and not (ours and theirs):
                continue
            if ours != theirs:
                diffs.append((name, ours, theirs))
        if any(d[0] == "target_modules" for d in diffs):
            # the base's digests are taken over its parameter names, which name the wrapped layers
            # ("...q_proj.base_layer.weight"): other adapted layers change them, whatever the base
            diffs = [d for d in diffs if d[0] not in ("base_weight_shapes_sha", "base_weights_sha")]
        return diffs


class FingerprintMismatch(DyLoRAError):
    """The checkpoint was made for another architecture; exit status 2 with a table."""

    exit_code = 2

    def __init__(self, reference: str, diffs: list[tuple[str, Any, Any]], hint: str = ""):
        self.diffs = diffs
        width = max(len("field"), *(len(d[0]) for d in diffs))
        rows = [f"  {'field':<{width}}  {'checkpoint':<24}  requested"]
        rows += [f"  {n:<{width}}  {_short(a):<24}  {_short(b)}" for n, a, b in diffs]
        self.table = "\n".join(rows)
        super().__init__(
            f"checkpoint {reference!r} does not fit the requested model: {len(diffs)} architecture field(s) "
            f"differ. Resume with the checkpoint's settings, or start a new run.{hint}"
        )


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
