"""reports/seeds.json (steerline.report.seeds): headlines per seed with mean and range, goals
counted per seed, experiments read from their git refs and refused when more than seed differs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from steerline.core.errors import UserError
from steerline.report import seeds

PARAMS = {"seed": 0, "data_seed": 0, "risk_diff": {"n_permutations": 1000}}


def reports(top1: float, finetuned: float, met: bool) -> dict[str, object]:
    return {
        "reports/moefy.json": {"top1_agreement": top1, "mean_kl": 0.3},
        "reports/risk_diff_summary.json": {"significant": {"pooled": {"q_perm": 200}}},
        "reports/experts_summary.json": {"n_unsafe": 16},
        "reports/safety_eval.json": {
            "base": {"refusal_unsafe": 0.05, "over_refusal_safe": 0.0},
            "finetuned": {"refusal_unsafe": finetuned, "over_refusal_safe": 0.05}},
        "reports/safety_eval_details.json": {"comparisons": {
            "finetuned": {"goal": "refusal_unsafe +>= 20 points", "goal_met": met}}},
    }


def test_summary_gives_each_headline_per_seed_with_mean_and_range() -> None:
    runs = {s: reports(t, f, m).__getitem__
            for s, (t, f, m) in {0: (0.76, 0.30, True), 1: (0.78, 0.10, False),
                                 2: (0.77, 0.26, True)}.items()}
    out = seeds.summarize(runs)
    assert out["seeds"] == [0, 1, 2]
    top1 = out["headlines"]["moefy.top1_agreement"]
    assert top1["per_seed"] == {"0": 0.76, "1": 0.78, "2": 0.77}
    assert (top1["min"], top1["max"]) == (0.76, 0.78) and top1["mean"] == pytest.approx(0.77)
    assert out["headlines"]["finetuned.refusal_unsafe"]["mean"] == pytest.approx(0.22)
    assert out["goals"]["finetuned"] == {"goal": "refusal_unsafe +>= 20 points",
                                         "met": {"0": True, "1": False, "2": True},
                                         "n_met": 2, "n_seeds": 3}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def commit_run(root: Path, params: dict, files: dict[str, object], message: str) -> str:
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for rel, obj in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(obj))
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    return git(root, "rev-parse", "HEAD")


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    git(tmp_path, "init", "-q")
    base = commit_run(tmp_path, PARAMS, reports(0.76, 0.30, True), "seed 0")
    # two experiments as DVC stores them: refs/exps/<baseline sha>/<name>
    for seed, name, extra in ((1, "seed-1", {}), (2, "lr", {"risk_diff": {"n_permutations": 9}})):
        sha = commit_run(tmp_path, {**PARAMS, "seed": seed, **extra},
                         reports(0.7 + seed / 100, 0.2, False), name)
        git(tmp_path, "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/{name}", sha)
        git(tmp_path, "reset", "-q", "--hard", base)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_experiments_are_read_from_their_refs(repo: Path) -> None:
    runs = seeds.collect(repo, ["seed-1"])
    assert sorted(runs) == [0, 1]
    assert runs[1]("reports/moefy.json")["top1_agreement"] == 0.71
    seeds.main(["seed-1", "--out", "reports/seeds.json"])
    out = json.loads((repo / "reports/seeds.json").read_text())
    assert out["goals"]["finetuned"]["n_met"] == 1 and out["seeds"] == [0, 1]


@pytest.mark.parametrize(("names", "match"), [
    (["lr"], r"differs from params.yaml in \['risk_diff'\]"),
    (["seed-9"], "no DVC experiment named 'seed-9'"),
])
def test_bad_experiments_are_refused(repo: Path, names: list[str], match: str) -> None:
    with pytest.raises(UserError, match=match):
        seeds.collect(repo, names)
