"""Run every SteerMoE stage on one checkpoint in a scratch workspace, one stage at a time, each
under GNU time: wall seconds and peak RSS per stage (docs/cost_model.md).

    python scripts/make_geometry_checkpoint.py --geometry qwen3-30b-a3b --out /tmp/geom/ckpt/q3
    python scripts/geometry_run.py --model /tmp/geom/ckpt/q3 --work /tmp/geom/q3 \
        --set finetune_experts.on_empty_selection=risk_diff_ranking --only risk_diff@base ...

The workspace gets a copy of params.yaml with `model` set to the checkpoint (and each --set
KEY=VALUE applied), a copy of data/prompts/safety.parquet, and links to stages/, data/raw and
data/judge; the stage commands are dvc.yaml's, resolved for the workspace (no DVC, no lock).
Results: WORK/geometry_run.json (one row per stage: seconds, peak RSS, return code).
Peak RSS is GNU time's: the largest single process of the stage (a subprocess counts when waited
for), not their sum.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from steerline.core.io import write_json

ROOT = Path(__file__).resolve().parents[1]
# dvc.yaml's SteerMoE stages in an order that respects their deps
STAGES = ("capture_routing@base", "risk_diff@base", "select_experts@base", "finetune_experts",
          "capture_routing@finetuned", "risk_diff@finetuned", "select_experts@finetuned",
          "train_gate@base", "train_gate@finetuned", "answer_safety_base",
          "answer_safety_finetuned", "eval_safety")


def stage_commands(dvc: dict, params: dict) -> dict[str, str]:
    """Each SteerMoE stage's cmd with ${item.*} and ${key} resolved (DVC's interpolation, for
    the forms dvc.yaml uses: item fields and top-level params)."""
    cmds: dict[str, str] = {}
    for name, stage in dvc["stages"].items():
        items = stage.get("foreach", {None: {}})
        body = stage.get("do", stage)
        for key, item in items.items():
            cmd = re.sub(r"\$\{item\.(\w+)\}", lambda m, it=item: str(it[m.group(1)]), body["cmd"])
            cmd = re.sub(r"\$\{(\w+)\}", lambda m: str(params[m.group(1)]), cmd)
            cmds[name if key is None else f"{name}@{key}"] = cmd
    return {s: cmds[s] for s in STAGES}


def set_key(params: dict, dotted: str, value: str) -> None:
    *path, last = dotted.split(".")
    node = params
    for k in path:
        node = node[k]
    node[last] = yaml.safe_load(value)


def prepare(work: Path, model: Path, sets: list[str]) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = str(model)
    for s in sets:
        key, value = s.split("=", 1)
        set_key(params, key, value)
    for folder in ("data/prompts", "reports", "models"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prompts = work / "data/prompts/safety.parquet"
    if not prompts.exists():
        shutil.copyfile(ROOT / "data/prompts/safety.parquet", prompts)
        prompts.chmod(0o444)
    for link in ("stages", "data/raw", "data/judge"):
        if not (work / link).exists():
            (work / link).symlink_to(ROOT / link)
    return params


def max_rss_kib(time_report: str) -> int:
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_report).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--only", nargs="*", default=None, help="stages to run (default: all)")
    args = ap.parse_args()
    work = args.work.resolve()
    params = prepare(work, args.model.resolve(), args.set)
    cmds = stage_commands(yaml.safe_load((ROOT / "dvc.yaml").read_text()), params)
    out = work / "geometry_run.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    for stage in args.only or STAGES:
        log, timed = work / f"logs/{stage}.log", work / f"logs/{stage}.time"
        log.parent.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.call(["/usr/bin/time", "-v", "-o", str(timed), "bash", "-c",
                                  cmds[stage]], cwd=work, stdout=f, stderr=subprocess.STDOUT)
        rows[stage] = {"seconds": round(time.perf_counter() - t0, 1),
                       "peak_rss_mib": round(max_rss_kib(timed.read_text()) / 1024),
                       "rc": rc, "cmd": cmds[stage]}
        print(f"{stage}: {rows[stage]['seconds']} s, {rows[stage]['peak_rss_mib']} MiB, rc {rc}",
              flush=True)
        write_json(rows, out)
        if rc:
            raise SystemExit(f"{stage} failed: see {log}")


if __name__ == "__main__":
    main()
