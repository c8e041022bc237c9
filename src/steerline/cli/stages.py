"""`steerline stages`: the pipeline's stage graph from dvc.yaml, with what each stage reads
(data deps and params; package modules counted) and writes (outs, metrics, plots)."""

from __future__ import annotations

import argparse
import shutil
import textwrap
from pathlib import Path
from typing import Any

import yaml

from steerline.cli.common import CliError

PACKAGE = "src/steerline/"


def _paths(entries: list[Any] | None) -> list[str]:
    """dvc.yaml list entries (a path, or {path: options}) -> paths."""
    out = []
    for item in entries or []:
        out.extend([item] if isinstance(item, str) else list(item))
    return out


def read_stages(path: Path) -> dict[str, dict[str, list[str]]]:
    """stage -> {"cmd", "reads", "params", "modules", "writes"} from a dvc.yaml."""
    if not path.is_file():
        raise CliError(f"{path} not found: run from the project root or pass --dvc-yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CliError(f"{path} is not valid YAML: {err}") from None
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise CliError(f"{path} has no stages")
    out = {}
    for name, st in stages.items():
        deps = _paths(st.get("deps"))
        params = []
        for p in st.get("params") or []:
            params.extend([p] if isinstance(p, str) else list(p))
        out[name] = {
            "cmd": [str(st.get("cmd", ""))],
            "reads": [d for d in deps if not d.startswith(PACKAGE) and not d.startswith("stages/")],
            "modules": [d for d in deps if d.startswith(PACKAGE)],
            "params": [str(p) for p in params],
            "writes": _paths(st.get("outs")) + _paths(st.get("metrics")) + _paths(st.get("plots")),
        }
    return out


def _produces(out: str, dep: str) -> bool:
    return dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep + "/")


def edges(stages: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """stage -> the stages that read something it writes."""
    return {a: [b for b in stages if b != a and any(_produces(o, d) for o in stages[a]["writes"]
                                                     for d in stages[b]["reads"])]
            for a in stages}


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="the stage graph: what each stage reads and writes",
                       description="Stages of dvc.yaml in order, each with the files and params "
                                   "it reads, what it writes and the stages that use it.")
    p.add_argument("--dvc-yaml", default="dvc.yaml", metavar="PATH")


def run(args: argparse.Namespace) -> None:
    stages = read_stages(Path(args.dvc_yaml))
    down = edges(stages)
    width = shutil.get_terminal_size((100, 24)).columns

    def show(label: str, text: str) -> None:
        print(textwrap.fill(text, width, initial_indent=f"  {label:<8}",
                            subsequent_indent=" " * 10))

    for name, st in stages.items():
        print(name)
        reads = ", ".join(st["reads"]) or "-"
        if st["modules"]:
            reads += f" (+ {len(st['modules'])} package modules)"
        show("reads", reads)
        if st["params"]:
            show("params", ", ".join(st["params"]))
        show("writes", ", ".join(st["writes"]) or "-")
        show("used by", ", ".join(down[name]) or "-")
