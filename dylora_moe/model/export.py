"""One expert of a mixture as a standard PEFT LoRA adapter, loadable by ``PeftModel.from_pretrained``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ConfigError


def export_expert(model, expert: int, directory: str | os.PathLike) -> Path:
    """Write expert ``expert`` of ``model`` (a ``DyLoRAMoE``) as a PEFT LoRA adapter in ``directory``.

    With shared experts the adapter is what the mixture computes when every example is routed to
    ``expert`` (``force_expert``): the shared experts and that expert, their fixed gates folded
    into B, as one LoRA of rank (shared + 1) x r with the mixture's alpha / r."""
    from peft import LoraConfig

    if not 0 <= expert < model.num_experts:
        raise ConfigError(f"expert index {expert} is out of range: the mixture has {model.num_experts} experts.")
    config = model.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = list(model.adapted_layers())
    fan_in_fan_out = {layer.fan_in_fan_out for _, layer in layers}
    if len(fan_in_fan_out) > 1:
        raise ConfigError("cannot export a mixture that adapts both Linear and Conv1D layers as one PEFT adapter.")
    ranks = (config.shared_experts + 1) * config.r
    peft_config = LoraConfig(
        r=ranks,
        lora_alpha=config.alpha * ranks / config.r,  # PEFT scales by lora_alpha / r: the same scale
        lora_dropout=config.dropout,
        target_modules=[name for name, _ in layers],
        fan_in_fan_out=fan_in_fan_out.pop(),
        base_model_name_or_path=config.base_model_name_or_path,
        task_type="CAUSAL_LM",
    )
    peft_config.save_pretrained(str(directory))
    tensors = {}
    for name, layer in layers:
        A, B = layer.expert_weights(expert)
        if layer.shared_experts:
            share, routed = layer.shared_scales()
            A = torch.cat([layer.shared_A, A])
            B = torch.cat([layer.shared_B * share, B * routed], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().contiguous().cpu()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory
