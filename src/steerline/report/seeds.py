"""reports/seeds.json: each SteerMoE headline per seed, with its mean and range, and on how many
seeds each eval_safety goal holds.

A run is one value of params.yaml's `seed` (what the methods draw: the MoEfication's calibration
tokens and k-means, permutations, bootstraps, finetuning order); `data_seed` holds the splits, so
every seed is scored on the same test prompts. The runs are this checkout's reports and the DVC
experiments named on the command line (`make seeds` queues and runs them):

    python -m steerline.report.seeds seed-1 seed-2

An experiment is read from its git ref (its metrics files are git-tracked); the newest ref of a
name wins. Every run must have this checkout's params.yaml but for `seed`, and seeds must differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from steerline.core.errors import UserError, run_stage
from steerline.core.io import read_json, write_json

OUT = Path("reports/seeds.json")
Files = Callable[[str], Any]  # a report's path under the run -> its parsed JSON


def headlines(read: Files) -> dict[str, float]:
    """One run's headline numbers by name (e.g. moefy.top1_agreement, finetuned.refusal_unsafe)."""
    moefy, rd = read("reports/moefy.json"), read("reports/risk_diff_summary.json")
    experts, rates = read("reports/experts_summary.json"), read("reports/safety_eval.json")
    out = {"moefy.top1_agreement": moefy["top1_agreement"], "moefy.mean_kl": moefy["mean_kl"],
           "risk_diff.significant_q_perm": rd["significant"]["pooled"]["q_perm"],
           "experts.n_unsafe": experts["n_unsafe"]}
    for variant, m in rates.items():
        for key in ("refusal_unsafe", "over_refusal_safe"):
            out[f"{variant}.{key}"] = m[key]
    return out


def goals(read: Files) -> dict[str, tuple[str, bool]]:
    """eval_safety's goals of one run: variant -> (goal text, met)."""
    comp = read("reports/safety_eval_details.json")["comparisons"]
    return {v: (c["goal"], bool(c["goal_met"])) for v, c in comp.items() if "goal" in c}


def summarize(runs: dict[int, Files]) -> dict[str, Any]:
    """seeds.json from each seed's reports: per seed, mean and range of every headline; the
    number of seeds on which each goal is met."""
    per = {seed: headlines(read) for seed, read in sorted(runs.items())}
    gs = {seed: goals(read) for seed, read in sorted(runs.items())}
    names = list(next(iter(per.values())))
    out: dict[str, Any] = {"seeds": list(per), "headlines": {}, "goals": {}}
    for name in names:
        values = {str(s): per[s][name] for s in per if name in per[s]}
        xs = list(values.values())
        out["headlines"][name] = {"per_seed": values, "mean": round(statistics.fmean(xs), 6),
                                  "min": min(xs), "max": max(xs)}
    first = next(iter(gs.values()))
    for variant, (goal, _) in first.items():
        met = {str(s): gs[s][variant][1] for s in gs if variant in gs[s]}
        out["goals"][variant] = {"goal": goal, "met": met,
                                 "n_met": sum(met.values()), "n_seeds": len(met)}
    return out


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def experiment_ref(name: str) -> str:
    """The newest git ref of DVC experiment `name` (refs/exps/<baseline>/<name>)."""
    refs = [r for r in _git("for-each-ref", "--sort=-committerdate", "--format=%(refname)",
                            "refs/exps/").split() if r.rsplit("/", 1)[-1] == name]
    if not refs:
        raise UserError(f"no DVC experiment named {name!r}: run `make seeds` (or `dvc exp run "
                        f"--queue -n {name} -S seed=N`, then `dvc queue start`) first")
    return refs[0]


def git_reader(ref: str) -> Files:
    def read(path: str) -> Any:
        try:
            return json.loads(_git("show", f"{ref}:{path}"))
        except subprocess.CalledProcessError as e:
            raise UserError(f"experiment {ref} has no {path}: did its run finish?") from e
    return read


def workspace_reader(root: Path) -> Files:
    def read(path: str) -> Any:
        if not (root / path).is_file():
            raise UserError(f"{path} is missing: run `dvc repro` first")
        return read_json(root / path)
    return read


def collect(root: Path, names: Sequence[str]) -> dict[int, Files]:
    """seed -> reader: the workspace and each named experiment, checked to differ from the
    workspace's params.yaml only in `seed`."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    runs = {int(params["seed"]): workspace_reader(root)}
    rest = {k: v for k, v in params.items() if k != "seed"}
    for name in names:
        ref = experiment_ref(name)
        theirs = yaml.safe_load(_git("show", f"{ref}:params.yaml"))
        other = sorted(k for k in (set(rest) | set(theirs)) - {"seed"}
                       if rest.get(k) != theirs.get(k))
        if other:
            raise UserError(f"experiment {name} differs from params.yaml in {other}, not only "
                            "in seed: rerun it from this checkout's params")
        seed = int(theirs["seed"])
        if seed in runs:
            raise UserError(f"experiment {name} has seed {seed}, which another run has")
        runs[seed] = git_reader(ref)
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m steerline.report.seeds", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="*", help="DVC experiment names (e.g. seed-1 seed-2)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    def go() -> None:
        result = summarize(collect(Path("."), args.experiments))
        write_json(result, args.out)
        for goal, g in result["goals"].items():
            print(f"{goal}: goal met on {g['n_met']} of {g['n_seeds']} seeds")
        print(f"wrote {args.out} (seeds {result['seeds']})")

    run_stage(go, "seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
