"""Which CPython standard-library modules the shipped base model never saw.

The base model (``dylora_moe/model/shipped/tiny-python-lm``) is pretrained on the standard library
minus these top-level modules and packages; the built-in ``stdlib_functions`` dataset is drawn from
them only, so fine-tuning on it measures learning something new rather than recall.
"""

from __future__ import annotations

import pathlib
import sysconfig

HELD_OUT_MODULES: tuple[str, ...] = (
    "_pydecimal",
    "calendar",
    "difflib",
    "email",
    "http",
    "imaplib",
    "ipaddress",
    "mailbox",
    "statistics",
    "tarfile",
    "xml",
)

# Never used for anything: test suites, IDLE, vendored third-party code.
EXCLUDED_PARTS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"})


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _top_level(path: pathlib.Path, root: pathlib.Path) -> str:
    first = path.relative_to(root).parts[0]
    return first[:-3] if first.endswith(".py") else first


def stdlib_files(held_out: bool) -> list[pathlib.Path]:
    """Sorted stdlib source files, either the held-out modules or everything else."""
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in EXCLUDED_PARTS or p.startswith("test_") for p in parts):
            continue
        if (_top_level(path, root) in HELD_OUT_MODULES) == held_out:
            files.append(path)
    return files
