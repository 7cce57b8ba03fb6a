"""The built-in stdlib_functions set: docstring -> function pairs from held-out modules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from dylora_moe.data.builtin import DEFAULT_MAX_CHARS, extract_pairs, stdlib_function_records
from dylora_moe.data.stdlib_split import stdlib_files


@pytest.fixture(scope="module")
def records():
    return stdlib_function_records()


def test_about_a_thousand_pairs(records):
    assert 900 <= len(records) <= 1100, len(records)


def test_deterministic(records):
    assert stdlib_function_records() == records
    fresh = extract_pairs(stdlib_files(held_out=True))  # no cache involved
    assert fresh == records


def test_outputs_are_whole_functions_without_docstring(records):
    for r in records:
        module = ast.parse(r["output"])
        assert len(module.body) == 1
        fn = module.body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)), r["output"][:80]
        assert ast.get_docstring(fn) is None
        assert not (fn.name.startswith("__") and fn.name.endswith("__"))
        assert len(r["output"]) <= DEFAULT_MAX_CHARS
        assert r["instruction"] and r["instruction"] == r["instruction"].strip()
        assert r["input"].lstrip().startswith(("def ", "async def ")) and fn.name in r["input"]
        assert r["source"] == "stdlib_functions"


def test_methods_are_dedented_and_keep_decorators(records):
    methods = [r for r in records if "(self" in r["input"]]
    assert len(methods) > 100
    assert all(r["output"].startswith(("def ", "async def ", "@")) for r in records)
    assert any(r["output"].startswith("@") for r in records)


def test_pairs_come_from_held_out_modules(records):
    held_out = "\n".join(p.read_text(encoding="utf-8") for p in stdlib_files(held_out=True))
    assert all(r["input"].splitlines()[0] in held_out for r in records)


def test_trivial_and_long_functions_are_skipped(tmp_path):
    source = '''
def trivial(self):
    """Return x."""
    return self._x

def useful(a, b):
    """Add two numbers, then double.

    More text here.
    """
    total = a + b
    return total * 2

def __dunder__(self):
    """Never used."""
    value = compute(self)
    return value + other(self)

class Box:
    def method(self, items):
        """Keep the long items."""
        kept = [i for i in items if len(i) > 3]
        return sorted(kept)

def long_one(x):
    """Too long."""
    text = """''' + "y" * 300 + '''"""
    return text + x
'''
    path = tmp_path / "sample.py"
    path.write_text(source)
    pairs = extract_pairs([path], max_chars=200)
    assert [p["input"] for p in pairs] == ["def useful(a, b):", "def method(self, items):"]
    assert pairs[0]["instruction"] == "Add two numbers, then double.\n\nMore text here."
    assert pairs[0]["output"] == "def useful(a, b):\n    total = a + b\n    return total * 2"
    assert pairs[1]["output"].startswith("def method(self, items):\n    kept = ")


def test_pairs_come_from_every_held_out_module_of_this_interpreter(records):
    """The count depends on the running CPython's stdlib (printed); every held-out module gives pairs."""
    import os

    from dylora_moe.data.stdlib_split import HELD_OUT_MODULES, stdlib_root

    print(f"stdlib_functions: {len(records)} pairs on Python {sys.version.split()[0]}")
    root = stdlib_root()
    assert root.resolve() == Path(os.__file__).resolve().parent  # this interpreter's stdlib
    files = stdlib_files(held_out=True)
    assert files and all(root in f.parents for f in files)
    inputs = {r["input"] for r in records}
    for module in HELD_OUT_MODULES:
        own = [f for f in files if f.relative_to(root).parts[0] in (module, module + ".py")]
        assert own, f"held-out module {module} not found in {root}"
        pairs = extract_pairs(own)
        assert pairs and any(p["input"] in inputs for p in pairs), module
