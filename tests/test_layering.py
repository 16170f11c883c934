"""The library's layers (docs/DESIGN.md, "Layout"): each folder of infomax/ imports only from the folders before it
in LAYERS, so training imports nothing of the eval, and no module imports itself back through others. Every
import counts, a function's lazy one too."""

from __future__ import annotations

import ast

from conftest import REPO

LAYERS = ["config", "runtime", "data", "method", "features", "export", "train", "eval", "launch"]


def imports() -> dict[str, set[str]]:
    """Module name -> the infomax modules it imports anywhere in its text (``from a.b import c`` counts a.b.c
    when that is a module, else a.b)."""
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "infomax").rglob("*.py")}
    found: dict[str, set[str]] = {}
    for module, path in files.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
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
            for p in (REPO / "infomax").rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert long == [], long
