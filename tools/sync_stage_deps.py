"""Rewrite the src/ deps of every stage in dvc.yaml to the modules its script imports.

Usage: python -m tools.sync_stage_deps   (tests/test_stage_deps.py checks the result)
"""

from __future__ import annotations

import re
from pathlib import Path

from tools.stage_deps import stage_src_deps

DVC = Path("dvc.yaml")


def main() -> None:
    lines = DVC.read_text().splitlines(keepends=True)
    out: list[str] = []
    for line in lines:
        if re.match(r"\s+- src/steerline/", line):
            continue  # regenerated below
        out.append(line)
        m = re.match(r"(\s+)- (stages/\w+\.py)\s*$", line)
        if m:
            out.extend(f"{m[1]}- {dep}\n" for dep in stage_src_deps(m[2]))
    DVC.write_text("".join(out))


if __name__ == "__main__":
    main()
