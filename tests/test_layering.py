"""The library's layers (docs/DESIGN.md, "Layout"): each folder of infomax/ imports only from the folders before it
in LAYERS, so training imports nothing of the eval, and no module imports itself back through others. Every
import counts, a function's lazy one too."""

from __future__ import annotations

import ast
import functools
import pickle
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LAYERS = ["config", "runtime", "data", "method", "features", "export", "train", "eval", "launch"]


@functools.cache
def syntax_trees() -> dict[Path, ast.Module]:
    """Every module of infomax/ parsed, in a child interpreter: CPython 3.11 before 3.11.9 keeps the AST
    constructor's recursion depth in state shared by threads (python/cpython#106905), so a parse here can fail
    with a SystemError while a loader thread left by an earlier test in this worker compiles with numba."""
    paths = sorted((REPO / "infomax").rglob("*.py"))
    parse = "import ast, pickle, sys; pickle.dump([ast.parse(open(p).read()) for p in sys.argv[1:]], sys.stdout.buffer)"
    trees = pickle.loads(subprocess.run([sys.executable, "-I", "-c", parse, *map(str, paths)],
                                        check=True, capture_output=True).stdout)
    return dict(zip(paths, trees, strict=True))


def imports() -> dict[str, set[str]]:
    """Module name -> the infomax modules it imports anywhere in its text (``from a.b import c`` counts a.b.c
    when that is a module, else a.b)."""
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in syntax_trees()}
    found: dict[str, set[str]] = {}
    for module, path in files.items():
        names = set()
        for node in ast.walk(syntax_trees()[path]):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("infomax"):
                names |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("infomax")}
        found[module] = names - {module}
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 or parts[1:] and parts[1] in LAYERS else -1


def test_each_layer_imports_only_the_layers_before_it() -> None:
    offenders = [f"{m} imports {n}" for m, names in imports().items() for n in names if layer(n) > layer(m)]
    assert offenders == [], offenders


def test_training_imports_nothing_of_the_eval() -> None:
    training = [m for m in imports() if layer(m) in range(LAYERS.index("train") + 1)]
    assert "infomax.train.loop" in training and "infomax.method.objectives" in training
    offenders = [f"{m} imports {n}" for m in training for n in imports()[m] if n.startswith("infomax.eval")]
    assert offenders == [], offenders


def test_no_import_cycle() -> None:
    graph, cycles = imports(), []

    def visit(module: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(module, ())):
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert cycles == [], cycles[:5]


def test_no_function_of_the_library_is_over_60_lines() -> None:
    """A function that long does several jobs: split it where its comments draw the sections."""
    long = [f"{p.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p, tree in syntax_trees().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert long == [], long
