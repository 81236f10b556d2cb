"""The architecture, enforced (docs/architecture.md): the import contract holds, every module has a
layer, and the import graph has no cycle (function-level imports included: grimp sees those too)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _architecture():
    """benchmarks/architecture.py, the one place that finds the import cycles (it also prints them)."""
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "benchmarks" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_contract_holds():
    """`lint-imports`: the layers of pyproject's [tool.importlinter], and graders never imports flywheel."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"the import contract is broken:\n{done.stdout}\n{done.stderr}"
    assert "0 broken" in done.stdout, done.stdout


def test_every_module_has_a_layer():
    """A new top-level module of flywheel must be placed in a layer (else the contract ignores it); the
    API's own contract is `exhaustive` (import-linter checks that one)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers" and "containers" not in c]
    placed = {name.strip() for layer in layers for part in layer.split("|") for name in part.split(":")}
    package = ROOT / "flywheel"
    modules = {f"flywheel.{p.stem}" for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    modules |= {f"flywheel.{p.name}" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert not modules - placed, f"give these modules a layer in pyproject.toml: {sorted(modules - placed)}"
    assert not placed - modules - {"graders"}, f"layers name modules that do not exist: {sorted(placed - modules)}"


def test_no_import_cycle():
    """No strongly connected component in the module graph of flywheel and graders."""
    cycles = _architecture().import_cycles()
    assert not cycles, "import cycles (break each at the right depth, not with a function-level import):\n" + \
        "\n".join(" <-> ".join(component) for component in cycles)


def test_cycle_finder_finds_a_cycle():
    """The finder itself: a ring of three is one component, a tail into it is not part of it."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _architecture().strongly_connected(edges) == [["a", "b", "c"]]
