"""The package modules a stage script imports, transitively: what its dvc.yaml deps must list.

A parent package's `__init__.py` runs on every import of one of its modules, so it counts too.
Imports inside functions count (they run when the stage does). The params schema does not
(see NOT_DEPS).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "steerline"
# The params schema only validates values (it holds none: params.yaml does, and dvc.yaml's
# `params:` tracks each stage's values); listing it would rerun every stage on any schema edit.
NOT_DEPS = frozenset({"steerline/core/params.py"})


def _module_file(src: Path, module: str) -> Path | None:
    base = src.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imported_modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == PACKAGE:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)  # submodule imports
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
    return out


def stage_src_deps(script: str | Path, src: str | Path = "src") -> list[str]:
    """Sorted repo-relative paths of every package file `script` imports, transitively."""
    src = Path(src)
    seen: set[Path] = set()
    todo = [Path(script)]
    while todo:
        for module in _imported_modules(todo.pop()):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # parents' __init__.py run first
                f = _module_file(src, ".".join(parts[:i]))
                if f is not None and f not in seen:
                    seen.add(f)
                    todo.append(f)
    return sorted(str(p) for p in seen
                  if p.relative_to(src).as_posix() not in NOT_DEPS)
