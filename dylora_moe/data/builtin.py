"""The built-in ``stdlib_functions`` dataset: docstring -> function pairs, needing no files.

Pairs come from the standard-library modules the shipped base model never saw
(:func:`dylora_moe.data.stdlib_split.stdlib_files` with ``held_out=True``), parsed with ``ast``:

- instruction: the function's docstring (``inspect.cleandoc``-ed, trailing spaces removed);
- input: its ``def`` line(s) as written, decorators excluded;
- output: its source without the docstring, decorators included, dedented for methods.

Module-level functions and methods (of nested classes too) are used; nested functions, dunder
methods, functions without a docstring, trivial bodies (fewer than ``min_body_nodes`` AST nodes
after the docstring, e.g. ``pass`` or ``return self._x``) and outputs over ``max_chars`` are
skipped, and so are repeats of an output already taken. Files are read in sorted order and
functions in source order, so the list is the same on every run of a given Python version
(about 1,000 pairs on CPython 3.11).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from pathlib import Path

from .stdlib_split import stdlib_files, stdlib_root

DEFAULT_MAX_CHARS = 2000
DEFAULT_MIN_BODY_NODES = 6

_Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(body: list[ast.stmt], prefix: str = ""):
    """(qualified name, node) of the functions and methods in ``body``, in source order."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            yield from _functions(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, _Function):
            yield f"{prefix}{node.name}", node


def _pair(lines: list[str], node: _Function, min_body_nodes: int, max_chars: int):
    """(signature, output) for one function, or None when it is skipped."""
    name = node.name
    if name.startswith("__") and name.endswith("__"):
        return None
    doc_node, rest = node.body[0], node.body[1:]
    if ast.get_docstring(node) is None or not rest:
        return None
    if sum(1 for stmt in rest for _ in ast.walk(stmt)) < min_body_nodes:
        return None
    # The docstring must sit on lines of its own for the line-based cut below to be exact.
    if doc_node.lineno <= node.lineno or rest[0].lineno <= doc_node.end_lineno:
        return None
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    head = lines[start - 1: doc_node.lineno - 1]
    tail = lines[doc_node.end_lineno: node.end_lineno]
    output = textwrap.dedent("".join(head + tail)).strip("\n")
    signature = textwrap.dedent("".join(lines[node.lineno - 1: doc_node.lineno - 1])).strip()
    if len(output) > max_chars or output[:1].isspace():
        return None
    try:
        ast.parse(output)
    except SyntaxError:  # e.g. a multi-line string at column 0 that dedent could not shift
        return None
    return signature, output


def _clean_docstring(doc: str) -> str:
    """``inspect.cleandoc`` plus no trailing spaces on any line."""
    return "\n".join(line.rstrip() for line in inspect.cleandoc(doc).splitlines()).strip()


def extract_pairs(
    files: list[Path],
    max_chars: int = DEFAULT_MAX_CHARS,
    min_body_nodes: int = DEFAULT_MIN_BODY_NODES,
) -> list[dict[str, str]]:
    """Records {instruction, input, output, source} for the documented functions in ``files``."""
    records, seen = [], set()
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        lines = source.splitlines(keepends=True)
        for _, node in _functions(tree.body):
            pair = _pair(lines, node, min_body_nodes, max_chars)
            if pair is None or pair[1] in seen:
                continue
            seen.add(pair[1])
            records.append({
                "instruction": _clean_docstring(ast.get_docstring(node, clean=False)),
                "input": pair[0],
                "output": pair[1],
                "source": "stdlib_functions",
            })
    return records


@functools.lru_cache(maxsize=4)
def _cached(max_chars: int, min_body_nodes: int, root: str) -> tuple[dict[str, str], ...]:
    return tuple(extract_pairs(stdlib_files(held_out=True), max_chars, min_body_nodes))


def stdlib_function_records(
    max_chars: int = DEFAULT_MAX_CHARS, min_body_nodes: int = DEFAULT_MIN_BODY_NODES
) -> list[dict[str, str]]:
    """The ``stdlib_functions`` records (fresh dicts; the extraction is cached per process)."""
    return [dict(r) for r in _cached(max_chars, min_body_nodes, str(stdlib_root()))]
