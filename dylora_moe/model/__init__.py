"""The DyLoRA-MoE model: the fused mixture-of-LoRA layer (``moe_lora``), the hybrid router
(``router``), the wrapper (``dylora``: wrap a base, forward, generate), its files on disk (``io``),
the mixture under a fixed gate as a PEFT adapter or merged into its base (``export``, ``gates``)
and a trained mixture for inference (``trained``).

The names load on first use (PEP 562), so that importing ``dylora_moe.model.base`` or
``dylora_moe.model.config`` (as ``dylora --help``, ``--version`` and ``dylora ckpt`` do) does not
import torch, transformers and peft.
"""

from importlib import import_module

_MODULE_OF = {
    "DyLoRAConfig": ".config",
    "DyLoRAMoE": ".dylora",
    "DyLoRAOutput": ".dylora",
    "MoELoRALinear": ".moe_lora",
    "HybridRouter": ".router",
    "RouterStats": ".router",
    "RoutingContext": ".router",
    "RoutingSettings": ".router",
    "RoutingState": ".router",
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
