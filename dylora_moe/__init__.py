"""dylora-moe: Dynamic LoRA Mixture of Experts with checkpoints that survive anything."""

__version__ = "0.1.0"
