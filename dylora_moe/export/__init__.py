"""``dylora export`` and ``dylora merge``: a trained mixture under a fixed gate as a standard PEFT LoRA
adapter (``gated.py`` resolves the gate, dataset prototypes included, and writes the directories),
or merged into its base model's weights. The flags live in ``command.py`` (docs/export.md)."""
