"""The DyLoRA-MoE model: fused mixture-of-LoRA layer, hybrid router, wrapper."""

from .config import DyLoRAConfig
from .dylora import DyLoRAMoE, DyLoRAOutput
from .moe_lora import MoELoRALinear
from .router import HybridRouter, RouterStats, RoutingState

__all__ = ["DyLoRAConfig", "DyLoRAMoE", "DyLoRAOutput", "MoELoRALinear", "HybridRouter", "RouterStats", "RoutingState"]
