"""Imports run one way, through every module of dylora_moe, function-local imports included.

The rooms (a top-level folder, or a top-level module) and their order, from DESIGN.md's
"errors/runtime <- model, data, checkpoint <- eval <- train <- cli <- job":

    dylora_moe (its __init__: the version), errors     import nothing of the package
    runtime (signals, launcher environment, tracking)  the rooms above
    model, data, checkpoint                            the rooms above, and NOT one another
    eval                                               the rooms above
    train                                              the rooms above
    serve, cloud (the submitting side), export         the rooms above, and not one another
    cli (the table of subcommands)                     the rooms above
    job (the container side), __main__                 the rooms above

A room imports only rooms above it in this list (and itself). The siblings model, data and
checkpoint stay apart: a checkpoint is files (it takes the model's tensors, not the model), a
model needs no store to run, and whatever joins two of them (loading a mixture from a checkpoint
reference, tokenising data for a model) lives in eval/ or train/. DESIGN.md leaves out serve/ and
cloud/; they stand where their imports put them: cli imports each one's command, cloud's command
checks train's flags.

Every import statement counts, wherever it stands (module level, inside a function, under
``if``): each one runs sooner or later. An import of a name that a package exports lazily
(PEP 562: a dict in its ``__init__`` from the name to the submodule it loads) counts as an import
of that submodule.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dylora_moe"
ROOT = PACKAGE.name

LAYERS = [
    {ROOT, "errors"},
    {"runtime"},
    {"model", "data", "checkpoint"},
    {"eval", "generate"},
    {"train"},
    {"serve", "cloud", "export"},
    {"cli"},
    {"job", "__main__"},
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, for its __init__)."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def lazy_exports(init_source: str, package: str, modules: set[str]) -> dict[str, str]:
    """Name -> submodule, from the top-level dicts of an ``__init__`` that map names to its submodules."""
    exports = {}
    for node in ast.parse(init_source).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            try:
                table = ast.literal_eval(node.value)
            except ValueError:
                continue
            targets = {k: f"{package}.{v.lstrip('.')}" for k, v in table.items()
                       if isinstance(k, str) and isinstance(v, str)}
            if targets and len(targets) == len(table) and set(targets.values()) <= modules:
                exports.update(targets)
    return exports


def imported_modules(source: str, module: str, is_package: bool, modules: set[str],
                     lazy: dict[str, dict[str, str]] | None = None) -> set[str]:
    """The modules of the package that ``module`` imports (relative imports resolved; ``from P import
    name`` is an import of the submodule ``P.name`` when there is one, else of the module ``P``, or of
    the submodule that ``P`` loads ``name`` from lazily)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    lazy = lazy or {}
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            origin = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                names.add(sub if sub in modules else lazy.get(origin, {}).get(alias.name, origin))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if (n == ROOT or n.startswith(ROOT + ".")) and n != module}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = module_files(package)
    modules = set(files)
    lazy = {name: lazy_exports(path.read_text(), name, modules) for name, path in files.items()
            if path.name == "__init__.py"}
    return {name: imported_modules(path.read_text(), name, path.name == "__init__.py", modules, lazy)
            for name, path in files.items()}


GRAPH = import_graph()


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def folder_graphs(graph: dict[str, set[str]], package: Path = PACKAGE) -> dict[str, dict[str, set[str]]]:
    """For every folder, the imports among its entries (a module, the folder's __init__, or a subfolder
    taken whole): an import between two modules is an edge between the entries of the deepest folder
    holding both."""
    files = module_files(package)
    is_package = {m: files[m].name == "__init__.py" for m in graph}
    folders: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))

    def path_of(module: str) -> list[str]:  # the folders down to the module, then its entry name
        parts = module.split(".")
        return parts + ["__init__"] if is_package[module] else parts

    for source, targets in graph.items():
        for target in targets:
            a, b = path_of(source), path_of(target)
            depth = 0
            while a[depth] == b[depth]:
                depth += 1
            folders[".".join(a[:depth])][a[depth]].add(b[depth])
    return folders


def assert_allowed(rooms_from: set[str], allowed) -> None:
    """Every import by a module of ``rooms_from`` from another room passes ``allowed(source room,
    target room)``; the failure lists each one that does not, as ``module -> imported module``."""
    refused = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if room(m) in rooms_from
                     for t in targets if room(t) != room(m) and not allowed(room(m), room(t)))
    assert not refused, "imports against the layers:\n" + "\n".join(refused)


# ---------------------------------------------------------------------------------------------------
def test_the_graph_sees_function_local_relative_and_lazily_exported_imports():
    modules = {"dylora_moe", "dylora_moe.errors", "dylora_moe.model", "dylora_moe.model.dylora",
               "dylora_moe.model.config", "dylora_moe.eval", "dylora_moe.eval.task", "dylora_moe.eval.x"}
    lazy = {"dylora_moe.model": lazy_exports('_MODULE_OF = {"DyLoRAMoE": ".dylora", "DyLoRAConfig": ".config"}\n'
                                             'OTHER = {"a": 1}\n', "dylora_moe.model", modules)}
    assert lazy["dylora_moe.model"] == {"DyLoRAMoE": "dylora_moe.model.dylora",
                                        "DyLoRAConfig": "dylora_moe.model.config"}
    source = ("import os\nimport dylora_moe\nfrom .task import Task\n"
              "def f():\n    from ..model import DyLoRAMoE\n    from ..errors import ConfigError\n"
              "class C:\n    def g(self):\n        if True:\n            from . import task\n")
    assert imported_modules(source, "dylora_moe.eval.x", False, modules, lazy) == {
        "dylora_moe", "dylora_moe.eval.task", "dylora_moe.model.dylora", "dylora_moe.errors"}
    # and in the package itself: the benchmark registry loads its benchmarks inside a function
    assert {"dylora_moe.eval.humaneval", "dylora_moe.eval.mbpp"} <= GRAPH["dylora_moe.eval.benchmarks"]


def test_every_room_has_a_place_in_the_layers():
    assert sorted({room(m) for m in GRAPH} - set(RANK)) == []


def test_docs_layout_states_these_layers():
    """docs/layout.md's table (level | room | what it owns) is the same layering as LAYERS, room for room."""
    import re

    table = (PACKAGE.parent / "docs" / "layout.md").read_text()
    documented = {room: int(level) for level, room in re.findall(r"^\| (\d+) \| `([\w.]+?)(?:\.py|/)` \|", table, re.M)}
    assert documented == {room: RANK[room] for room in RANK if room != ROOT}


def test_no_import_cycle_between_modules():
    found = cycles(GRAPH)
    assert not found, "modules that import one another (each line: a cycle's members):\n" + "\n".join(map(str, found))


def test_no_import_cycle_between_the_entries_of_any_folder():
    """At every level (the package's top-level folders and modules, each folder's modules and subfolders),
    a folder's entries import one another without a cycle."""
    found = {folder: c for folder, entries in folder_graphs(GRAPH).items() if (c := cycles(entries))}
    assert not found, "entries that import one another, by folder:\n" + "\n".join(f"{f}: {c}" for f, c in found.items())


def test_model_data_and_checkpoint_import_only_errors_runtime_and_the_version():
    base = LAYERS[0] | LAYERS[1]
    assert_allowed({"model", "data", "checkpoint"}, lambda source, target: target in base)


def test_eval_never_imports_train():
    assert_allowed({"eval"}, lambda source, target: target != "train")


def test_the_submit_side_never_imports_the_container_side_or_the_cli():
    assert_allowed({"cloud"}, lambda source, target: target not in {"job", "cli", "__main__"})


def test_every_import_runs_down_the_layers():
    assert_allowed(set(RANK), lambda source, target: RANK.get(target, len(LAYERS)) < RANK[source])
