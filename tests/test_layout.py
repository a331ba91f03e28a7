"""The package's floors: every import points to the same floor or a lower one, and no module imports
itself back through others (no cycles). Imports inside functions are only for optional or heavy
dependencies, and each says which.

Floors, bottom to top (a package's modules share its floor):
  0  config, batch, errors            settings dataclasses, the shared data types, user-error exits
  1  flow, rl, rewards, memory, runs  pure algorithm code, the planner, run files
  2  model                            loading + LoRA, attention capture, kernels
  3  generation, data                 rollouts; prompts and sources
  4  credit, evaluation               credit arms; eval engine and statistics
  5  train                            the GRPO / SFT modules and what orchestrates a run
  6  tools, integrations              research commands; adapters for other trainers
  7  cli                              the `flowtracer` command
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "flowtracer"
FLOORS = {"config": 0, "batch": 0, "errors": 0, "__init__": 0,
          "flow": 1, "rl": 1, "rewards": 1, "memory": 1, "runs": 1,
          "model": 2, "generation": 3, "data": 3, "credit": 4, "evaluation": 4, "train": 5,
          "tools": 6, "integrations": 6, "cli": 7}
# imports allowed inside a function: optional or heavy third-party packages (each line carries a comment)
LAZY_OK = ("math_verify", "reasoning_gym", "datasets", "pyarrow", "matplotlib", "tensorboard", "triton",
           "transformers.integrations", "transformers.masking_utils", "trl", "ray", "submitit")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _floor(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return FLOORS[top]


def _imports(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported flowtracer module, node, inside a function) for every import of the file."""
    tree = ast.parse(path.read_text())
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in funcs for n in ast.walk(f)}
    out = []
    me = _module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = me.split(".")
                base = parts[: len(parts) - node.level + (path.name == "__init__.py")]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
            targets = [n if (PKG / Path(*n.split(".")[1:])).with_suffix(".py").exists()
                       or (PKG / Path(*n.split(".")[1:])).is_dir() else mod for n in names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            out.append((t, node, id(node) in inner))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        me = _module_name(path)
        graph[me] = {t for t, _, _ in _imports(path) if t.startswith("flowtracer") and t != me}
    return graph


def test_every_import_points_down_or_across():
    up = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module_name(path)
        for target, node, _ in _imports(path):
            if target.startswith("flowtracer.") and target != me and _floor(target) > _floor(me):
                up.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} (floor {_floor(target)} > "
                          f"{_floor(me)})")
    assert not up, "imports that point up a floor:\n" + "\n".join(up)


def test_no_import_cycles():
    graph = _graph()
    # a module importing its own package's __init__ re-exports is not a cycle of code; drop those edges
    for me, targets in graph.items():
        targets.discard(me.rsplit(".", 1)[0])
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt in graph and not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_are_optional_or_heavy_and_say_so():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text().splitlines()
        for target, node, inside in _imports(path):
            if not inside:
                continue
            comment = any("#" in lines[i - 1] for i in range(node.lineno - 1, node.end_lineno + 1) if i >= 1)
            if path.name == "cli.py" and target == "importlib":
                continue
            if not target.startswith(LAZY_OK) or not comment:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} inside a function")
    assert not bad, "move these imports to the top of the file (or name the optional dependency):\n" + "\n".join(bad)


def _own_private_names() -> set[str]:
    """`_name`s the project's own classes define (methods and `self._name = ...`)."""
    names = set()
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in ast.walk(node):
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("_"):
                        names.add(item.name)
                    if isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store) \
                            and isinstance(item.value, ast.Name) and item.value.id == "self":
                        names.add(item.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_helper_touches_another_objects_private_attributes():
    """`obj._name` of the project's own classes only on self/cls: pass a helper what it needs.
    (Private hooks of torch and transformers that the capture and packed linears rely on are theirs.)"""
    own = _own_private_names()
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in own:
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                    continue
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not bad, "private attributes of other objects:\n" + "\n".join(bad)
