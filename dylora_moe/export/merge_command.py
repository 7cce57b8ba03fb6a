"""``dylora merge``: the base model with a mixture under a fixed gate merged into its weights."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import EXIT_STATUS_HELP
from .command import common_options, run  # noqa: F401  (run: export's handler serves both)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    merge = subparsers.add_parser(
        "merge", help="the base model with a mixture under a fixed gate merged into its weights",
        description="Merge the mixture under a fixed gate into the base model's weights (PEFT merge_and_unload of "
        "the exported adapter) and write a plain Hugging Face model directory with the tokenizer: no inference "
        "overhead. Refused for token routing (no gate is fixed per request) and for a quantized base. "
        "See docs/export.md.", epilog=EXIT_STATUS_HELP)
    common_options(merge)
    return merge
