"""Shared pieces of the `steerline` command: the error type every subcommand raises for bad
input (printed as one line, no traceback), expert-list parsing, the pipeline's params
(params.yaml through its schema) and the default model they name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

PARAMS = Path("params.yaml")
# the MoE commands' --model help: the value comes from default_model()
MODEL_DEFAULT = "params.yaml's `model`, the MoE the pipeline steers"
PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class CliError(Exception):
    """Bad input or missing files: the message says what to fix."""


def parse_pairs(text: str, flag: str) -> tuple[tuple[int, int], ...]:
    """"3:5,4:1" -> ((3, 5), (4, 1)); one clear error for anything else."""
    pairs = []
    for item in text.split(","):
        m = PAIR.match(item)
        if m is None:
            raise CliError(f"{flag} takes LAYER:EXPERT pairs separated by commas (e.g. "
                           f"{flag} 3:5,12:0), got {item.strip()!r}")
        pairs.append((int(m[1]), int(m[2])))
    return tuple(pairs)


def pipeline_params(params: Path = PARAMS) -> dict[str, Any]:
    """The pipeline's params as plain values: `params` checked by its schema (every key; a
    wrong one is one line naming it) in the project, else the schema's CliDefault values (the
    committed params.yaml's, for the keys the command reads)."""
    from steerline.core.params import cli_defaults, load_params  # here: --help without pydantic

    if not params.is_file():
        return cli_defaults()
    return load_params(params).model_dump()


def default_model(params: Path = PARAMS) -> str:
    """The MoE commands' --model when none is given: params.yaml's `model` in the project,
    else its CliDefault (build_models' MoE)."""
    return str(pipeline_params(params)["model"])


def params_section(name: str, params: Path = PARAMS) -> dict[str, Any]:
    """One section of pipeline_params ({} outside the project when no key of it has a
    CliDefault)."""
    return pipeline_params(params).get(name, {})


def param_default(value: Any, section: str, key: str, flag: str) -> Any:
    """`value` when given on the command line, else the pipeline's section.key; an error naming
    the flag when neither is there (outside the project, a key without a CliDefault)."""
    if value is not None:
        return value
    found = params_section(section).get(key)
    if found is None:
        raise CliError(f"{flag} not given and no {section}.{key} in {PARAMS} (run from the "
                       f"project root or pass {flag})")
    return found


def require_file(path: str | Path, what: str, fix: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{p} not found ({what}): {fix}")
    return p
