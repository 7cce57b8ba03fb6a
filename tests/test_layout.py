"""The package's rooms and their import direction, as docs/layout.md states them: every import (function-local
ones included) goes to a room on the same level or a lower one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "dylora_moe"


def levels() -> dict[str, int]:
    """Room -> level, from the table of docs/layout.md (``errors.py`` -> errors, ``runtime/`` -> runtime)."""
    rows = re.findall(r"^\| (\d+) \| `([\w.]+?)(?:\.py|/)` \|", (REPO_ROOT / "docs" / "layout.md").read_text(), re.M)
    return {room: int(level) for level, room in rows}


def room_of(module: str) -> str:
    """``dylora_moe.train.config`` -> train; ``dylora_moe`` itself (its ``__version__``) counts as errors' level."""
    parts = module.split(".")
    in_a_room = len(parts) > 1 and ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file())
    return parts[1] if in_a_room and parts[1] != "__init__" else "errors"


def imports(path: Path) -> list[tuple[str, int]]:
    """(absolute dylora_moe module, line) for every import in ``path``, relative ones resolved."""
    package = path.relative_to(REPO_ROOT).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(name, node.lineno) for name in names if name.split(".")[0] == "dylora_moe"]
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "shipped" not in p.parts)


def test_every_room_of_the_package_is_in_the_layout():
    known = levels()
    assert {"errors", "runtime", "model", "data", "checkpoint", "eval", "train", "cloud", "cli", "job"} <= set(known)
    rooms = {room_of(".".join(p.relative_to(REPO_ROOT).with_suffix("").parts)) for p in modules()}
    assert rooms <= set(known), f"rooms missing from docs/layout.md: {sorted(rooms - set(known))}"


def test_imports_never_go_up():
    level = levels()
    upward = []
    for path in modules():
        source = room_of(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts))
        for module, line in imports(path):
            target = room_of(module)
            if level[target] > level[source]:
                upward.append(f"{path.relative_to(REPO_ROOT)}:{line} ({source}, level {level[source]}) imports "
                              f"{module} ({target}, level {level[target]})")
    assert not upward, "\n".join(upward)


def test_runtime_imports_only_errors_and_the_submitting_side_never_the_container_or_the_cli():
    for path in (PACKAGE / "runtime").rglob("*.py"):
        assert {room_of(m) for m, _ in imports(path)} <= {"errors", "runtime"}, path
    for path in (PACKAGE / "cloud").rglob("*.py"):
        assert not {room_of(m) for m, _ in imports(path)} & {"job", "cli"}, path
