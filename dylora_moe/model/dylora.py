"""``DyLoRAMoE``: a frozen Hugging Face causal LM with routed LoRA experts injected in place.

Like PEFT's LoRA tuner, the base keeps its own modules; each target linear is replaced by a
:class:`MoELoRALinear` that holds the original as ``base_layer``. Nothing of the base is trained
or copied (tied embeddings stay tied). Only experts, routers and maturity flags are state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from .base import load_base_model
from .config import ALL_LINEAR, MLP, MLP_MODULES, DyLoRAConfig
from .export import export_expert, export_gated
from .io import base_model_name, read_config, read_weights, write_mixture
from .moe_lora import MoELoRALinear
from .router import RouterStats, RoutingSettings, RoutingState

MATURITY_KEY = "routing.mature"
ADMISSION_KEY = "routing.admission"


@dataclass
class DyLoRAOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + coefficients x auxiliary losses
    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    mi_loss: torch.Tensor | None = None
    dataset_mi_loss: torch.Tensor | None = None
    router_stats: RouterStats | None = None


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter (or gradient) that FSDP shards over ranks (a collective: every rank
    calls it); any other tensor as it is."""
    full_tensor = getattr(tensor, "full_tensor", None)  # a DTensor
    return full_tensor() if full_tensor is not None else tensor


def find_target_modules(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Full names of the modules to adapt; unknown names are an error listing what exists."""
    candidates = {name: m for name, m in model.named_modules() if name and _is_adaptable(m)}
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if targets == ALL_LINEAR:
        return [n for n, m in candidates.items() if m is not output_layer]
    if targets == MLP:
        chosen = [n for n, m in candidates.items()
                  if m is not output_layer and set(n.split(".")[:-1]) & set(MLP_MODULES)]
        if not chosen:
            raise ConfigError(
                f"target_modules '{MLP}' found no linear layer inside a module named {' or '.join(MLP_MODULES)} in "
                f"{type(model).__name__}: name the layers to adapt (known names: "
                f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in candidates}))}) or use '{ALL_LINEAR}'.")
        return chosen
    chosen, unknown = [], []
    for target in targets:
        hits = [n for n in candidates if n == target or n.endswith("." + target)]
        (chosen.extend(hits) if hits else unknown.append(target))
    if unknown:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ConfigError(
            f"target module(s) {', '.join(repr(u) for u in unknown)} not found among the linear layers "
            f"of {type(model).__name__}. Known names: {', '.join(leaf_names)}; or use '{MLP}' or '{ALL_LINEAR}'."
        )
    return sorted(set(chosen), key=list(candidates).index)


class DyLoRAMoE(nn.Module):
    def __init__(self, base_model: PreTrainedModel | str, config: DyLoRAConfig | None = None, **base_kwargs):
        super().__init__()
        config = config or DyLoRAConfig()
        if isinstance(base_model, (str, os.PathLike)):
            config.base_model_name_or_path = str(base_model)
            base_model = load_base_model(str(base_model), **base_kwargs)
        elif config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base_model.config, "_name_or_path", None) or None
        if any(isinstance(m, MoELoRALinear) for m in base_model.modules()):
            raise ConfigError("this base model already carries DyLoRA-MoE experts; load a fresh copy of the base.")
        self.config = config
        self.base_model = base_model
        for p in base_model.parameters():
            p.requires_grad_(False)

        mature = torch.tensor(config.mature or [False] * config.num_experts, dtype=torch.bool)
        if mature.numel() != config.num_experts:
            raise ConfigError(f"maturity has {mature.numel()} flags for {config.num_experts} experts.")
        self.routing = RoutingState(
            mature=mature,
            admission=torch.ones(config.num_experts),
            settings=RoutingSettings(top_k=config.top_k, temperature=config.router_temperature,
                                     granularity=config.routing, scale=config.router_scale, floor=config.gate_floor),
        )
        self.adapted_names = find_target_modules(base_model, config.target_modules)
        for name in self.adapted_names:
            parent_name, _, child = name.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            layer = MoELoRALinear(getattr(parent, child), self.routing, config.r, config.alpha, config.dropout,
                                  shared_experts=config.shared_experts)
            setattr(parent, child, layer)
        self._sync_config()

    # ------------------------------------------------------------------ structure
    def adapted_layers(self) -> Iterable[tuple[str, MoELoRALinear]]:
        for name in self.adapted_names:
            yield name, self.base_model.get_submodule(name)

    @property
    def num_experts(self) -> int:
        return self.routing.num_experts

    def _sync_config(self) -> None:
        self.config.num_experts = self.num_experts
        self.config.mature = [bool(m) for m in self.routing.mature]

    def add_expert(self) -> int:
        """Grow the mixture by one immature expert and return its index.

        The new expert has B = 0 and admission 0, so outputs are unchanged as long as the routing
        mode is (growing a fully mature mixture switches it back to dense routing, by design).
        Phase it in with :meth:`admit_expert`.
        """
        for _, layer in self.adapted_layers():
            layer.add_expert()
        self.routing.mature = torch.cat([self.routing.mature, torch.zeros(1, dtype=torch.bool)])
        self.routing.admission = torch.cat([self.routing.admission, torch.zeros(1)])
        self._sync_config()
        return self.num_experts - 1

    def admit_expert(self, expert: int, admission: float = 1.0) -> None:
        """Set how far a grown expert takes part in routing, from 0 (not at all) to 1 (fully)."""
        if not 0 <= expert < self.num_experts:
            raise ConfigError(f"expert index {expert} is out of range: the mixture has {self.num_experts} experts.")
        if not 0.0 <= admission <= 1.0:
            raise ConfigError(f"admission={admission!r} is invalid: it must be in [0, 1].")
        self.routing.admission[expert] = admission

    def set_maturity(self, experts: int | Sequence[int] | None = None, mature: bool = True) -> None:
        """Mark experts (all when None) mature or immature; all mature switches routing to top-k."""
        index = range(self.num_experts) if experts is None else [experts] if isinstance(experts, int) else experts
        for e in index:
            if not 0 <= e < self.num_experts:
                raise ConfigError(f"expert index {e} is out of range: the mixture has {self.num_experts} experts.")
            self.routing.mature[e] = mature
        self._sync_config()

    # ------------------------------------------------------------------ compute
    def forward(self, input_ids, attention_mask=None, labels=None, prompt_mask=None, dataset_ids=None,
                **kwargs) -> DyLoRAOutput:
        """Causal-LM forward. Per-example routing reads the prompt: ``prompt_mask`` (batch, seq), or
        the tokens whose label is -100 when ``labels`` are given, or else every non-padding token
        (then the whole input must be the prompt, as in generation). ``dataset_ids`` (batch,), each
        example's dataset, only feed the dataset-expert loss (``dataset_mi_coefficient``)."""
        token_mask = attention_mask.bool() if attention_mask is not None else None
        weights = {name: weight for name, weight in self._aux_weights().items() if weight}
        context = self.routing.context
        context.trained_terms = frozenset(weights)
        context.start_collecting(token_mask)
        context.dataset_ids = dataset_ids
        if self.routing.settings.granularity == "example" and not context.generating:
            context.prompt_mask = self._prompt_mask(input_ids, token_mask, labels, prompt_mask)
        try:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            stats = context.stop_collecting()
            context.dataset_ids = None
            if not context.generating:
                context.prompt_mask = None
        result = DyLoRAOutput(logits=out.logits, router_stats=stats)
        if labels is not None:
            zero = out.loss.new_zeros(())
            result.lm_loss = out.loss
            result.balance_loss = stats.balance_loss if stats else zero
            result.z_loss = stats.z_loss if stats else zero
            result.mi_loss = stats.mi_loss if stats else zero
            result.dataset_mi_loss = stats.dataset_mi_loss if stats else zero
            result.loss = out.loss
            for name, weight in weights.items():
                result.loss = result.loss + weight * getattr(result, name)
        return result

    def _aux_weights(self) -> dict[str, float]:
        """Each auxiliary loss (a field of :class:`DyLoRAOutput`) and its weight in the loss."""
        config = self.config
        return {"balance_loss": config.balance_coefficient, "z_loss": config.z_loss_coefficient,
                "mi_loss": config.router_mi_coefficient, "dataset_mi_loss": config.dataset_mi_coefficient}

    @staticmethod
    def _prompt_mask(input_ids, token_mask, labels, prompt_mask) -> torch.Tensor:
        attended = token_mask if token_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        if prompt_mask is not None:
            return prompt_mask.bool() & attended
        if labels is None:
            return attended
        prompt = attended & (labels == -100)
        # an example without prompt tokens (plain language modelling) routes from all its tokens
        return torch.where(prompt.any(-1, keepdim=True), prompt, attended)

    def generate(self, *args, **kwargs):
        """The base model's own ``generate`` (KV cache included). Token routing routes every new
        token; per-example routing routes each example once from its prompt and keeps that gate."""
        if self.routing.settings.granularity != "example":
            return self.base_model.generate(*args, **kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.routing.context.start_generating(mask.bool() if mask is not None
                                              else torch.ones_like(input_ids, dtype=torch.bool))
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            self.routing.context.stop_generating()

    # ------------------------------------------------------------------ state
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Experts, routers, maturity and admission: all training changes, nothing of the base."""
        state = {}
        for name, layer in self.adapted_layers():
            state[f"{name}.lora_A"] = whole_tensor(layer.lora_A.detach())
            state[f"{name}.lora_B"] = whole_tensor(layer.lora_B.detach())
            state[f"{name}.router.weight"] = whole_tensor(layer.router.weight.detach())
            if layer.shared_experts:
                state[f"{name}.shared_A"] = whole_tensor(layer.shared_A.detach())
                state[f"{name}.shared_B"] = whole_tensor(layer.shared_B.detach())
        state[MATURITY_KEY] = self.routing.mature.clone()
        state[ADMISSION_KEY] = self.routing.admission.clone()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], allow_growth: bool = False) -> None:
        """Load a trainable state; with ``allow_growth`` a state with fewer experts fills the first
        slots and the remaining experts become new (B = 0) and immature."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ConfigError(
                f"trainable state does not match this mixture: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}."
            )
        mature = state[MATURITY_KEY].bool()
        n = mature.numel()
        if n > self.num_experts or (n < self.num_experts and not allow_growth):
            raise ConfigError(f"state has {n} experts but the mixture has {self.num_experts}.")
        with torch.no_grad():
            for name, layer in self.adapted_layers():
                rows = n * layer.r  # the first n experts' slices of the stacked tensors
                slots = (("lora_A", layer.lora_A[:rows]), ("lora_B", layer.lora_B[:, :rows]),
                         ("router.weight", layer.router.weight[:n]))
                if layer.shared_experts:
                    slots += (("shared_A", layer.shared_A), ("shared_B", layer.shared_B))
                for key, param in slots:
                    value = state[f"{name}.{key}"]
                    if value.shape != param.shape:
                        raise ConfigError(f"{name}.{key} has shape {tuple(value.shape)}, "
                                          f"expected {tuple(param.shape)}.")
                    param.copy_(value)
                layer.lora_B[:, rows:].zero_()
        self.routing.mature[:n] = mature
        self.routing.mature[n:] = False
        self.routing.admission[:n] = state[ADMISSION_KEY].float()
        self._sync_config()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def expert_grad_norms(self) -> torch.Tensor:
        """The gradient norm of each routed expert (its slices of A and B over every adapted layer), on
        the CPU; zeros before a backward pass. Sharded gradients are gathered: every rank calls it."""
        squares = torch.zeros(self.num_experts)
        for _, layer in self.adapted_layers():
            E, r = layer.num_experts, layer.r
            if layer.lora_A.grad is not None:
                squares += whole_tensor(layer.lora_A.grad).float().unflatten(0, (E, r)).pow(2).sum((1, 2)).cpu()
            if layer.lora_B.grad is not None:
                squares += whole_tensor(layer.lora_B.grad).float().unflatten(1, (E, r)).pow(2).sum((0, 2)).cpu()
        return squares.sqrt()

    def save_pretrained(self, directory: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the config and the trainable state (``state``: one already gathered, e.g. from FSDP shards)."""
        self._sync_config()
        write_mixture(directory, self.config, state or self.trainable_state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base_model: PreTrainedModel | None = None, **base_kwargs):
        """A mixture written by :meth:`save_pretrained`, on ``base_model`` or else the base its config names."""
        config = read_config(directory)
        model = cls(base_model if base_model is not None else base_model_name(config, directory), config, **base_kwargs)
        model.load_trainable_state_dict(read_weights(directory))
        return model

    # ------------------------------------------------------------------ interop
    def force_expert(self, expert: int | None) -> None:
        """Route every token to one expert (None restores learned routing)."""
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ConfigError(f"expert index {expert} is out of range: the mixture has {self.num_experts} experts.")
        self.routing.forced_expert = expert

    def force_gates(self, gates: torch.Tensor | None) -> None:
        """Fix every router's gate: ``gates`` (adapted layers x experts), row i the gate of the i-th adapted
        layer for every token and example (None restores learned routing)."""
        if gates is None:
            self.routing.forced_gates = {}
            return
        layers = list(self.adapted_layers())
        if tuple(gates.shape) != (len(layers), self.num_experts):
            raise ConfigError(f"gates of shape {tuple(gates.shape)} do not fit this mixture: it needs "
                              f"({len(layers)} adapted layers, {self.num_experts} experts).")
        self.routing.forced_gates = {layer.router: gate.float() for (_, layer), gate in zip(layers, gates)}

    def export_gated(self, gates: torch.Tensor, directory: str | os.PathLike, **kwargs) -> Path:
        """Write the mixture under the fixed ``gates`` (layers x experts) as one standard PEFT LoRA adapter
        (see :func:`dylora_moe.model.export.export_gated`)."""
        return export_gated(self, gates, directory, **kwargs)

    def export_expert(self, expert: int, directory: str | os.PathLike) -> Path:
        """Write expert ``expert`` as a standard PEFT LoRA adapter loadable by ``PeftModel`` (see
        :func:`dylora_moe.model.export.export_expert`)."""
        return export_expert(self, expert, directory)


__all__ = ["DyLoRAMoE", "DyLoRAConfig", "DyLoRAOutput", "find_target_modules"]
