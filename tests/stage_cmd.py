"""The argv dvc.yaml gives a stage, rendered by DVC itself (foreach items, params interpolated),
so tests run a stage script exactly as `dvc repro` does, with no path restated here."""

from __future__ import annotations

import contextlib
import functools
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def stage_argv(name: str) -> tuple[str, ...]:
    """(script path, --option, value, ...) of stage `name` ('risk_diff@finetuned' for an item);
    the script path is absolute, the others as in dvc.yaml (relative to the workspace)."""
    from dvc.repo import Repo

    with contextlib.chdir(ROOT), Repo(str(ROOT)) as repo:
        (stage,) = repo.stage.collect(name)
        words = shlex.split(stage.cmd)
    while "=" in words[0]:  # environment assignments (OMP_WAIT_POLICY=PASSIVE)
        words.pop(0)
    assert words[0] == "python" and words[1].startswith("stages/"), stage.cmd
    return (str(ROOT / words[1]), *words[2:])


def call_stage(name: str) -> None:
    """Stage `name`'s pipeline `main` in this process, with dvc.yaml's paths and the params.yaml
    of the current directory; errors propagate (a stage script reports them in one line).
    The function and path classes are the ones the stage script hands to stage_cli."""
    import importlib
    import re

    from steerline.core.params import load_params
    from steerline.pipeline.stage import parse_paths

    argv = stage_argv(name)
    script = Path(argv[0]).read_text()
    call = re.search(r"stage_cli\(([^)]*)\)", script)
    assert call, f"{argv[0]} does not call stage_cli"
    module_name = re.search(r"from steerline\.pipeline import (\w+)", script)[1]
    module = importlib.import_module(f"steerline.pipeline.{module_name}")
    main, *kinds = (getattr(module, ref.strip().split(".")[1])
                    for ref in call[1].split(",") if ref.strip())
    main(load_params(), *parse_paths(kinds, argv[1:]))
