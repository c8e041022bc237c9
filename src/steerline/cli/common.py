"""Shared pieces of the `steerline` command: the error type every subcommand raises for bad
input (printed as one line, no traceback), expert-list parsing and params.yaml look-ups."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

PARAMS = Path("params.yaml")
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


def params_section(name: str, params: Path = PARAMS) -> dict[str, Any]:
    """One section of params.yaml (the pipeline's defaults), or {} when there is no file."""
    from steerline.core.params import load_yaml  # here: the CLI starts without pydantic

    if not params.is_file():
        return {}
    try:
        raw = load_yaml(params) or {}
    except yaml.YAMLError as err:
        raise CliError(f"{params} is not valid YAML ({err}); fix it or pass the values as flags"
                       ) from None
    section = raw.get(name, {}) if isinstance(raw, dict) else {}
    return section if isinstance(section, dict) else {}


def param_default(value: Any, section: str, key: str, flag: str) -> Any:
    """`value` when given on the command line, else params.yaml's section.key; an error naming
    the flag when neither is there."""
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
