"""Rewrite the src/ deps of every stage in dvc.yaml to the modules its script imports, and
prepare_safety's source deps to one `${prepare_safety.sources[i].path}` per source of params.yaml
(DVC interpolates an indexed key into deps, not a list).

Usage: python -m tools.sync_stage_deps   (tests/test_stage_deps.py checks the result)
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tools.stage_deps import stage_src_deps

DVC = Path("dvc.yaml")
PARAMS = Path("params.yaml")
SOURCE_DEP = re.compile(r"\s+- \$\{prepare_safety\.sources\[\d+\]\.path\}\s*$")


def source_deps() -> list[str]:
    """prepare_safety's dep lines for the sources of params.yaml (the format of
    steerline.pipeline.prepare_safety.source_dep, which checks them under dvc repro)."""
    sources = yaml.safe_load(PARAMS.read_text())["prepare_safety"]["sources"]
    return [f"${{prepare_safety.sources[{i}].path}}" for i in range(len(sources))]


def main() -> None:
    lines = DVC.read_text().splitlines(keepends=True)
    out: list[str] = []
    for line in lines:
        if re.match(r"\s+- src/steerline/", line) or SOURCE_DEP.match(line):
            continue  # regenerated below
        out.append(line)
        m = re.match(r"(\s+)- (stages/\w+\.py)\s*$", line)
        if m:
            out.extend(f"{m[1]}- {dep}\n" for dep in stage_src_deps(m[2]))
            if m[2] == "stages/prepare_safety.py":
                out.extend(f"{m[1]}- {dep}\n" for dep in source_deps())
    DVC.write_text("".join(out))


if __name__ == "__main__":
    main()
