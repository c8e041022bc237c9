"""`steerline stages`: the pipeline's stage graph from dvc.yaml, with what each stage reads
(data deps and params; package modules counted) and writes (outs, metrics, plots)."""

from __future__ import annotations

import argparse
import re
import shlex
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


_VAR = re.compile(r"\$\{\s*([\w.\[\]-]+)\s*\}")


def _render(value: Any, ctx: dict[str, Any], used: set[str] | None = None) -> Any:
    """DVC's `${a.b}` interpolation of strings inside `value` (lists and dicts walked; a list
    element as `${a.b[0].c}`, prepare_safety's source deps); each name filled is added to
    `used`."""
    if isinstance(value, str):
        def look(m: re.Match) -> str:
            if used is not None:
                used.add(m[1])
            node: Any = ctx
            for part in re.findall(r"[^.\[\]]+", m[1]):
                if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                elif isinstance(node, dict) and part in node:
                    node = node[part]
                else:
                    raise CliError(f"dvc.yaml: ${{{m[1]}}} is not defined (params.yaml or the "
                                   "foreach item)")
            return str(node)
        return _VAR.sub(look, value)
    if isinstance(value, list):
        return [_render(v, ctx, used) for v in value]
    if isinstance(value, dict):
        return {_render(k, ctx, used): _render(v, ctx, used) for k, v in value.items()}
    return value


def _interpolated(used: set[str]) -> list[str]:
    """The params keys among `${...}` names (not the foreach item's), list indices dropped
    (`prepare_safety.sources[0].path` -> `prepare_safety.sources.path`), sorted."""
    keys = {re.sub(r"\[\d+\]", "", u) for u in used}
    return sorted(k for k in keys if k not in ("item", "key") and not k.startswith("item."))


def expand_stages(stages: dict[str, Any], params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """dvc.yaml's `stages` as DVC runs them: a `foreach` stage becomes one `name@key` stage per
    item, and `${...}` is filled from the item and params.yaml. Each stage gets `interpolated`:
    the params keys filled into it (its own item's included), which DVC reruns it on as its
    cmd or deps change."""
    out: dict[str, dict[str, Any]] = {}
    for name, st in stages.items():
        if isinstance(st, dict) and "foreach" in st:
            raw = st["foreach"]
            pairs = raw.items() if isinstance(raw, dict) else ((None, v) for v in raw)
            for key, raw_item in pairs:
                used: set[str] = set()
                item = _render(raw_item, params, used)
                key = str(item) if key is None else key
                body = _render(st["do"], {**params, "item": item, "key": key}, used)
                out[f"{name}@{key}"] = {**body, "interpolated": _interpolated(used)}
        else:
            used = set()
            out[name] = {**_render(st, params, used), "interpolated": _interpolated(used)}
    return out


def read_stages(path: Path) -> dict[str, dict[str, list[str]]]:
    """stage -> {"cmd", "reads", "params", "modules", "writes"} from a dvc.yaml (and the
    params.yaml beside it, for `${...}`)."""
    if not path.is_file():
        raise CliError(f"{path} not found: run inside the project (dvc.yaml in this folder or "
                       "one above) or pass --dvc-yaml")
    from steerline.core.params import load_yaml  # aliases bounded (pydantic: loaded late)

    try:
        raw = load_yaml(path) or {}
        params_file = path.parent / "params.yaml"
        params = (load_yaml(params_file) or {}) if params_file.is_file() else {}
    except yaml.YAMLError as err:
        raise CliError(f"{path} is not valid YAML: {err}") from None
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise CliError(f"{path} has no stages")
    out = {}
    for name, st in expand_stages(stages, params).items():
        deps = _paths(st.get("deps"))
        params = []
        for p in st.get("params") or []:
            params.extend([p] if isinstance(p, str) else list(p))
        # a key filled into the cmd or deps (`--model ${model}`) is read as surely as a listed one
        params += [k for k in st["interpolated"] if not reads_param({"params": params}, k)]
        out[name] = {
            "cmd": [str(st.get("cmd", ""))],
            "reads": [d for d in deps if not d.startswith(PACKAGE) and not d.startswith("stages/")],
            "modules": [d for d in deps if d.startswith(PACKAGE)],
            "params": [str(p) for p in params],
            "writes": _paths(st.get("outs")) + _paths(st.get("metrics")) + _paths(st.get("plots")),
        }
    return out


def stage_argv(name: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The options dvc.yaml's cmd gives stage `name` ('risk_diff@finetuned' for a foreach item),
    `${...}` filled in: what a script passes to pipeline.stage.parse_paths to use the stage's
    own paths (scripts/finetune_ddp_check.py), none restated."""
    stages = read_stages(dvc_yaml)
    if name not in stages:
        raise CliError(f"{dvc_yaml} has no stage {name!r} (stages: {', '.join(stages)})")
    words = shlex.split(stages[name]["cmd"][0])
    while words and "=" in words[0]:  # environment assignments (OMP_WAIT_POLICY=PASSIVE)
        words.pop(0)
    if words[:1] != ["python"] or not words[1:2] or not words[1].startswith("stages/"):
        raise CliError(f"stage {name!r}: cmd is not `python stages/<script>.py ...`")
    return words[2:]


def _produces(out: str, dep: str) -> bool:
    return dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep + "/")


def edges(stages: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """stage -> the stages that read something it writes."""
    return {a: [b for b in stages if b != a and any(_produces(o, d) for o in stages[a]["writes"]
                                                     for d in stages[b]["reads"])]
            for a in stages}


def reads_param(stage: dict[str, list[str]], key: str) -> bool:
    """Whether a change of params key `key` (`a.b`) changes a param the stage lists: the key
    itself, a section holding it, or a key inside it."""
    return any(p == key or key.startswith(p + ".") or p.startswith(key + ".")
               for p in stage["params"])


def reruns(stages: dict[str, dict[str, list[str]]], key: str) -> tuple[list[str], list[str]]:
    """(stages `dvc repro` reruns when params key `key` changes, stages downstream of them that
    rerun only if an output they read changes), each in dvc.yaml's order."""
    direct = [n for n, st in stages.items() if reads_param(st, key)]
    down, seen, todo = edges(stages), set(direct), list(direct)
    while todo:
        for nxt in down[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return direct, [n for n in stages if n in seen and n not in direct]


def find_dvc_yaml(start: Path | None = None) -> Path:
    """dvc.yaml of the project around `start` (default: the working directory): the nearest
    folder upward that has one, as git and dvc find their roots; `start`/dvc.yaml when none
    has (the caller's not-found error names it)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder / "dvc.yaml"
    return here / "dvc.yaml"


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="the stage graph: what each stage reads and writes",
                       description="Stages of dvc.yaml in order, each with the files and params "
                                   "it reads, what it writes and the stages that use it.")
    p.add_argument("--dvc-yaml", metavar="PATH",
                   help="default: dvc.yaml of the project (this folder or the nearest above)")
    p.add_argument("--param", action="append", metavar="KEY",
                   help="only say which stages a change of this params key reruns "
                        "(e.g. lambda_sparse, select_experts.threshold); repeatable")


def run(args: argparse.Namespace) -> None:
    stages = read_stages(Path(args.dvc_yaml) if args.dvc_yaml else find_dvc_yaml())
    if args.param:
        for key in args.param:
            direct, then = reruns(stages, key)
            print(f"{key}: reruns {', '.join(direct) or 'no stage'}"
                  + (f"; then, if an output they read changes: {', '.join(then)}" if then
                     else ""))
        return
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
