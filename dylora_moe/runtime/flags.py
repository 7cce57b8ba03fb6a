"""Values of command-line flags that every command spells the same way."""

from __future__ import annotations

import argparse

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(value: str) -> bool:
    """``--flag true|false`` (and yes/no, on/off, 1/0), as argparse's ``type=``: a bad word is a usage error."""
    lowered = value.lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean: use true/false")
