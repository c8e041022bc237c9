"""How a stage script runs: its paths from argv (dvc.yaml's `cmd` states each one, once), the
params from params.yaml, then one call into its pipeline module.

    # stages/risk_diff.py
    from steerline.pipeline import risk_diff
    from steerline.pipeline.stage import stage_cli

    if __name__ == "__main__":
        stage_cli(risk_diff.main, risk_diff.Inputs, risk_diff.Outputs)

Every field of the given dataclasses becomes a required option (`report_png` -> `--report-png`),
so a stage has no path of its own to drift from dvc.yaml. A user error ends in one line
(steerline.core.errors.run_stage).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from steerline import numerics
from steerline.core.errors import run_stage
from steerline.core.params import load_params


def parse_paths(path_types: Sequence[type], argv: Sequence[str], doc: str | None = None
                ) -> list[Any]:
    """One instance of each dataclass in `path_types`, its fields from `--field-name VALUE`
    (fields annotated `Path` become Paths, the others stay strings, e.g. a hub model name)."""
    ap = argparse.ArgumentParser(description=doc)
    owners: list[tuple[type, str]] = []
    for kind in path_types:
        for f in dataclasses.fields(kind):
            if any(f.name == name for _, name in owners):
                raise TypeError(f"path field {f.name!r} appears in two of {path_types}")
            ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, required=True,
                            type=Path if "Path" in str(f.type) else str, metavar="PATH")
            owners.append((kind, f.name))
    args = vars(ap.parse_args(list(argv)))
    return [kind(**{name: args[name] for k, name in owners if k is kind}) for kind in path_types]


def stage_cli(main: Callable[..., object], *path_types: type,
              argv: Sequence[str] | None = None) -> None:
    """Run `main(params, *paths)` as a stage: paths from argv, params from ./params.yaml."""
    doc = sys.modules[main.__module__].__doc__
    paths = parse_paths(path_types, sys.argv[1:] if argv is None else argv, doc)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    numerics.check_if_loaded()  # the stage's modules are loaded: torch runs the contract
    run_stage(lambda: main(load_params(), *paths))
