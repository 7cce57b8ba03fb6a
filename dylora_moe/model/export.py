"""A mixture under a fixed gate as a standard PEFT LoRA adapter, and that adapter merged into its base.

Under a gate g (E,) fixed for a layer, the layer's update (``moe_lora``) is

    (alpha / r) · [s·shared_B, ρ·g_1·B_1, ..., ρ·g_E·B_E] · [shared_A; A_1; ...; A_E] · x

with s the shared experts' fixed gate and ρ the routed experts' share (1 without shared experts):
one ordinary LoRA of rank (S + E)·r whose B columns carry the gate (PEFT's "cat" combination of
adapters is the same identity). Per-example routing fixes the gate once the prompt is read, so for
a request whose router gate is g this adapter IS the mixture; for any other prompt it is the mixture
with g forced (``DyLoRAMoE.force_gates``). Experts whose gate is 0 in every layer (top-k) are left
out, which shrinks the rank and changes nothing.

The files are PEFT's own layout (``adapter_config.json``, ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight``), which ``PeftModel.from_pretrained`` and the multi-LoRA
servers (vLLM, SGLang, LoRAX) load; ``dylora_gate.json`` beside them records the gate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ConfigError

GATES_NAME = "dylora_gate.json"


def export_expert(model, expert: int, directory: str | os.PathLike) -> Path:
    """Write expert ``expert`` of ``model`` (a ``DyLoRAMoE``) as a PEFT LoRA adapter in ``directory``.

    With shared experts the adapter is what the mixture computes when every example is routed to
    ``expert`` (``force_expert``): the shared experts and that expert, their fixed gates folded
    into B, as one LoRA of rank (shared + 1) x r with the mixture's alpha / r."""
    from .gates import expert_gates

    return export_gated(model, expert_gates(model, expert), directory, description=f"expert:{expert}")


def _target_modules(model) -> list[str]:
    """The adapted layers as PEFT's ``target_modules``: their leaf names (``gate_proj``, what servers such
    as vLLM know) when those name exactly the adapted layers, else their full names (GPT-2's ``c_proj``
    is in the attention and in the MLP; adapting the MLP's alone needs the full names)."""
    names = list(model.adapted_names)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    matched = {n for n, _ in model.base_model.named_modules() if n and n.rsplit(".", 1)[-1] in leaves}
    return leaves if matched == set(names) else names


def export_gated(model, gates: torch.Tensor, directory: str | os.PathLike, *, drop_unused: bool = True,
                 description: str | None = None) -> Path:
    """Write ``model`` (a ``DyLoRAMoE``) under the fixed ``gates`` (adapted layers x experts, row i for the
    i-th of ``model.adapted_layers()``) as one PEFT LoRA adapter in ``directory``: rank (S + kept)·r with
    the mixture's scale alpha / r, kept = the experts whose gate is not 0 in some layer (all of them
    without ``drop_unused``). ``description`` (e.g. ``dataset:mbpp``) goes into ``dylora_gate.json``."""
    from peft import LoraConfig

    config = model.config
    layers = list(model.adapted_layers())
    gates = torch.as_tensor(gates, dtype=torch.float32).detach().cpu()
    if tuple(gates.shape) != (len(layers), model.num_experts):
        raise ConfigError(f"gates of shape {tuple(gates.shape)} do not fit this mixture: it needs "
                          f"({len(layers)} adapted layers, {model.num_experts} experts).")
    fan_in_fan_out = {layer.fan_in_fan_out for _, layer in layers}
    if len(fan_in_fan_out) > 1:
        raise ConfigError("cannot export a mixture that adapts both Linear and Conv1D layers as one PEFT adapter.")
    kept = [e for e in range(model.num_experts) if not drop_unused or bool((gates[:, e] != 0).any())]
    rank = (config.shared_experts + len(kept)) * config.r
    if rank == 0:
        raise ConfigError("every expert's gate is 0 and the mixture has no shared experts: the adapter would "
                          "change nothing (it is the base model).")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=config.alpha * rank / config.r,  # PEFT scales by lora_alpha / r: the mixture's alpha / r
        lora_dropout=config.dropout,
        target_modules=_target_modules(model),
        fan_in_fan_out=fan_in_fan_out.pop(),
        base_model_name_or_path=config.base_model_name_or_path,
        task_type="CAUSAL_LM",
    )
    peft_config.save_pretrained(str(directory))
    tensors = {}
    with torch.no_grad():
        for (name, layer), gate in zip(layers, gates):
            share, routed = layer.shared_scales() if layer.shared_experts else (0.0, 1.0)
            A = [layer.expert_weights(e)[0] for e in kept]
            B = [layer.expert_weights(e)[1] * (float(gate[e]) * routed) for e in kept]
            if layer.shared_experts:  # the shared experts' rows first, as in the fused layer
                A, B = [layer.shared_A, *A], [layer.shared_B * share, *B]
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.cat(A).contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.cat(B, dim=1).contiguous().cpu()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    record = {"gate": description, "rank": rank, "experts_kept": kept, "shared_experts": config.shared_experts,
              "routing": config.routing, "gates": {name: row.tolist() for (name, _), row in zip(layers, gates)}}
    (directory / GATES_NAME).write_text(json.dumps(record, indent=1) + "\n")
    return directory


def check_mergeable(model) -> None:
    """Refuse what cannot become plain weights: token routing (no gate is fixed per request) and a
    quantized base (adding the update to quantized weights would round it away)."""
    if model.config.routing != "example":
        raise ConfigError(
            "cannot merge a mixture with token routing: each token gets its own gate, so no one set of weights "
            "equals the mixture. Export it as an adapter instead (dylora export; the adapter then equals the "
            "mixture with the gate forced on every token), or merge a mixture trained with --routing example.")
    base = model.base_model
    quantization = getattr(base.config, "quantization_config", None) or getattr(base, "hf_quantizer", None)
    if (quantization is not None or getattr(base, "is_loaded_in_4bit", False)
            or getattr(base, "is_loaded_in_8bit", False)):
        method = getattr(quantization, "quant_method", None) or (
            quantization.get("quant_method") if isinstance(quantization, dict) else None)
        raise ConfigError(
            f"cannot merge into a quantized base model ({method or 'quantized'} weights): the update would be rounded "
            "into the quantized weights. Merge into the unquantized base model (and quantize the merged model "
            "afterwards), or serve the exported adapter (dylora export) on the quantized base.")


def release_base(model):
    """The base model of ``model`` (a ``DyLoRAMoE``) with every adapted layer put back to its own
    ``base_layer``: the plain Hugging Face model, without copying it. The mixture is unusable afterwards."""
    for name in model.adapted_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.base_model.get_submodule(parent_name) if parent_name else model.base_model
        setattr(parent, child, getattr(parent, child).base_layer)
    model.adapted_names = []
    return model.base_model


def merge_adapter(model, adapter_dir: str | os.PathLike):
    """The base of ``model`` with the adapter in ``adapter_dir`` (an :func:`export_gated` of it) merged into
    its weights by PEFT (``merge_and_unload``): a plain Hugging Face model. Consumes the mixture."""
    from peft import PeftModel

    check_mergeable(model)
    base = release_base(model)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
