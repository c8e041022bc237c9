"""The package's import graph: one layer per concern, every import pointing down, no circles.

Read from the source with `ast` (imports inside functions included: they run too), so a new
upward import or circle fails here before it couples two stages' dvc.yaml deps.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# bottom to top; packages on one row are siblings that must not import each other
LAYERS: list[tuple[str, ...]] = [
    ("numerics",),  # the numerics contract, loaded by steerline/__init__ before anything numeric
    ("core",),
    ("model",),
    ("steering",),
    ("backends",),
    ("steermoe", "mat_steer"),
    ("pipeline",),
    ("serve",),
    ("cli", "report"),
]
RANK = {pkg: i for i, row in enumerate(LAYERS) for pkg in row}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The package module `name` refers to (a `from pkg import module` names a module too)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """steerline module -> the steerline modules it imports (parents' __init__ not counted)."""
    files = {_module_name(p): p for p in SRC.joinpath("steerline").rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                if n.split(".")[0] == "steerline":
                    target = _resolve(n, modules)
                    if target and target != mod and target != "steerline":
                        out.add(target)
                        break  # one name per statement is enough to place the edge
        graph[mod] = out
    return graph


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_layer():
    missing = sorted({layer_of(m) for m in import_graph()} - set(RANK) - {""})
    assert not missing, f"packages with no layer in tests/test_layers.py: {missing}"


def test_imports_point_down_and_siblings_stay_apart():
    bad = []
    for mod, targets in sorted(import_graph().items()):
        if not layer_of(mod):
            continue
        for t in sorted(targets):
            a, b = layer_of(mod), layer_of(t)
            if a != b and RANK[b] >= RANK[a]:
                bad.append(f"{mod} -> {t}")
    assert not bad, "imports up or sideways across layers:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_sees_a_circle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert RANK[layer_of("steerline.backends.hf")] < RANK[layer_of("steerline.steermoe.x")]


@pytest.mark.parametrize("pkg", ["steermoe", "mat_steer"])
def test_methods_do_not_know_params(pkg):
    """Only the pipeline layer (and the apps above it) read the params schema."""
    users = sorted(m for m, t in import_graph().items()
                   if layer_of(m) == pkg and "steerline.core.params" in t)
    assert not users, f"{pkg} modules importing the params schema: {users}"
