"""select_experts: the selection rule on hand-made reports, and a planted signal end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from stage_cmd import call_stage

from steerline.core.io import write_parquet, write_table
from steerline.steermoe.detection.risk_diff import compute_risk_diff
from steerline.steermoe.detection.select_experts import experts_summary, select_experts
from steerline.steermoe.routing.manifest import write_routing_manifest
from steerline.steermoe.routing.schema import routing_metadata, routing_table

ROOT = Path(__file__).resolve().parents[1]


def rule(df: pd.DataFrame, **kw) -> dict:
    """select_experts with these tests' defaults, overridden by kw."""
    args = {"threshold": 0.05, "top_k": 50, "alpha": 0.05, "require": "pooled", **kw}
    return select_experts(df, **args)


def report(rows: list[tuple[int, int, float, float]]) -> pd.DataFrame:
    """A pooled-only report; q_perm is the prompt-level q-value the rule reads."""
    return pd.DataFrame(rows, columns=["layer", "expert", "risk_diff", "q_perm"])


def two_contrast_report() -> pd.DataFrame:
    rows = [  # layer, expert, pooled rd, pooled q, matched rd, matched q
        (0, 0, 0.30, 0.001, -0.02, 0.50),  # pooled only (a style expert)
        (0, 1, 0.10, 0.001, 0.20, 0.001),  # both; weaker (pooled) 0.10
        (0, 2, 0.06, 0.30, 0.25, 0.001),  # matched only
        (1, 0, 0.20, 0.01, 0.08, 0.04),  # both; weaker (matched) 0.08
        (1, 1, -0.20, 0.001, -0.10, 0.001),  # safe, both
        (1, 2, -0.30, 0.001, 0.01, 0.90),  # safe, pooled only
    ]
    cols = ["layer", "expert", "risk_diff", "q_perm", "matched_risk_diff", "matched_q_perm"]
    return pd.DataFrame(rows, columns=cols)


def test_rule_threshold_alpha_order_top_k() -> None:
    df = report(
        [
            (0, 0, 0.30, 0.001),
            (0, 1, 0.10, 0.01),
            (0, 2, 0.20, 0.20),  # q too large
            (1, 0, 0.04, 0.0001),  # below threshold
            (1, 1, 0.10, 0.001),  # ties (0, 1) on risk_diff, smaller q wins
            (1, 2, -0.25, 0.001),
            (2, 0, -0.06, 0.05),  # q == alpha passes
            (2, 1, -0.05, 0.0),  # not strictly beyond -threshold
        ]
    )
    out = select_experts(
        df, threshold=0.05, top_k=2, alpha=0.05, require="pooled", meta={"token_scope": "user"}
    )
    assert out["unsafe"] == [[0, 0], [1, 1]]
    assert out["safe"] == [[1, 2], [2, 0]]
    assert out["criteria"] == {
        "threshold": 0.05, "top_k": 2, "alpha": 0.05, "require": "pooled", "q_column": "q_perm",
        "token_scope": "user", "model": None,
    }  # fmt: skip
    assert rule(df, top_k=50)["unsafe"] == [[0, 0], [1, 1], [0, 1]]
    summary = experts_summary(df, out, {"null_threshold": "0.2"})
    assert summary["n_unsafe"] == 2 and summary["n_unsafe_beyond_null"] == 1
    assert summary["top_safe"][0] == {"layer": 1, "expert": 2, "risk_diff": -0.25}


def test_require_pooled_matched_both() -> None:
    df = two_contrast_report()
    pick = {r: rule(df, require=r) for r in ("pooled", "matched", "both")}
    assert pick["pooled"]["unsafe"] == [[0, 0], [1, 0], [0, 1]]
    assert pick["matched"]["unsafe"] == [[0, 2], [0, 1], [1, 0]]
    assert pick["both"]["unsafe"] == [[0, 1], [1, 0]]  # ranked by the weaker contrast
    assert pick["pooled"]["safe"] == [[1, 2], [1, 1]]
    assert pick["matched"]["safe"] == pick["both"]["safe"] == [[1, 1]]
    summary = experts_summary(df, pick["pooled"])
    assert summary["n_unsafe_matched_agrees"] == 2 and summary["n_safe_matched_agrees"] == 1
    assert summary["top_unsafe"][0] == {"layer": 0, "expert": 0, "risk_diff": 0.30,
                                        "matched_risk_diff": -0.02}  # fmt: skip
    with pytest.raises(ValueError, match="no column 'matched_q_perm'.*require='both'"):
        rule(df.drop(columns="matched_q_perm"), require="both")
    with pytest.raises(ValueError, match="require must be one of"):
        rule(df, require="either")


def test_none_pass_is_empty_not_error(caplog: pytest.LogCaptureFixture) -> None:
    df = report([(0, 0, 0.01, 0.9), (0, 1, -0.01, 0.9)])
    with caplog.at_level(logging.WARNING):
        out = rule(df)
    assert out["unsafe"] == [] and out["safe"] == []
    assert "no unsafe experts pass" in caplog.text


def test_bad_report() -> None:
    with pytest.raises(ValueError, match="no column 'q_perm'"):
        rule(report([(0, 0, 0.1, 0.0)]).drop(columns="q_perm"))
    with pytest.raises(ValueError, match="alpha"):
        rule(report([(0, 0, 0.1, 0.0)]), alpha=0.0)
    with pytest.raises(ValueError, match="missing values in column 'q_perm'.*n_permutations"):
        rule(report([(0, 0, 0.1, float("nan"))]))


# ---- planted signal: marked tokens of unsafe prompts routed to known experts ----

L, K, E = 4, 4, 16
# One unsafe and one safe expert per planted layer: forcing an expert into the top-k displaces
# others at that layer, and planting both labels there makes that displacement label-neutral.
PLANT_UNSAFE = [(1, 5), (3, 2), (0, 11)]
PLANT_SAFE = [(1, 9), (3, 14), (0, 3)]


def planted_routing(root: Path, seed: int = 0, n_prompts: int = 200) -> Path:
    """Random top-k routing; in unsafe prompts half the user tokens are "marked" (token ids
    below 100) and routed to PLANT_UNSAFE at those layers; safe prompts' marked tokens go to
    PLANT_SAFE. Template and generated tokens stay random, so scope 'user' isolates the signal."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    per_shard = 40
    for s in range(0, n_prompts, per_shard):
        cols: dict[str, list] = {k: [] for k in ("prompt_id", "label", "token_id", "user")}
        n_gen = []
        for i in range(s, min(s + per_shard, n_prompts)):
            n_user, n = int(rng.integers(10, 30)), 0
            marked = rng.random(n_user) < 0.5
            ids = np.where(marked, rng.integers(0, 100, n_user), rng.integers(100, 1000, n_user))
            toks = [7, 8, 9, *ids.tolist(), 10] + rng.integers(100, 1000, 5).tolist()
            n = len(toks)
            cols["prompt_id"] += [f"p{i}"] * n
            cols["label"] += ["unsafe" if i % 2 else "safe"] * n
            cols["token_id"] += toks
            cols["user"] += [False] * 3 + [True] * n_user + [False] * 6
            n_gen += [False] * (n - 5) + [True] * 5
        n_tok = len(cols["token_id"])
        experts = np.argsort(rng.random((n_tok, L, E)), axis=-1)[..., :K]  # [N, L, K]
        token_id = np.asarray(cols["token_id"])
        user = np.asarray(cols["user"])
        unsafe = np.asarray(cols["label"]) == "unsafe"
        is_marked = user & (token_id < 100)
        for plant, who in ((PLANT_UNSAFE, unsafe), (PLANT_SAFE, ~unsafe)):
            for layer, expert in plant:
                rows = np.flatnonzero(is_marked & who & ~(experts[:, layer] == expert).any(-1))
                experts[rows, layer, 0] = expert  # slot 0 was not `expert`: still distinct
        gen = np.asarray(n_gen)
        table = routing_table(
            cols["prompt_id"],
            cols["label"],
            np.arange(n_tok),
            token_id,
            gen,
            ~user & ~gen,
            experts.reshape(n_tok, L * K),
            np.full((n_tok, L * K), 1 / K),
        )
        write_table(table, root / f"{s:04d}.parquet", routing_metadata(L, K, E, "planted"))
    write_routing_manifest(root)
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return planted_routing(tmp_path_factory.mktemp("planted") / "routing")


def test_planted_experts_recovered_exactly(planted: Path) -> None:
    df, meta = compute_risk_diff(planted, "user", n_permutations=300, null_quantile=0.99, seed=0)
    out = rule(df, meta=meta)
    assert sorted(map(tuple, out["unsafe"])) == sorted(PLANT_UNSAFE)
    assert sorted(map(tuple, out["safe"])) == sorted(PLANT_SAFE)
    assert out["criteria"]["token_scope"] == "user" and out["criteria"]["model"] == "planted"
    rd = df.set_index(["layer", "expert"])
    planted_rd = np.array([rd.loc[p, "risk_diff"] for p in PLANT_UNSAFE])
    # a signal spread over many prompts: significant at token level and at prompt level
    planted_all = PLANT_UNSAFE + PLANT_SAFE
    assert (np.array([rd.loc[p, "q_token_z"] for p in planted_all]) < 1e-6).all()
    # p_perm = 1 / 301: no shuffle comes close; BH over 64 pairs with 6 at that p
    assert [rd.loc[p, "p_perm"] for p in planted_all] == [1 / 301] * 6
    assert (np.array([rd.loc[p, "q_perm"] for p in planted_all]) <= 64 / 6 / 301 + 1e-12).all()
    null = json.loads(meta["null_quantiles"])
    # the largest of 300 label-shuffled max |risk_diff| is far below every planted pair
    assert null["max"] < planted_rd.min() / 2
    assert int(meta["n_beyond_null"]) == len(PLANT_UNSAFE) + len(PLANT_SAFE)
    # unsafe list is ordered by risk_diff, highest first
    got = [rd.loc[tuple(p), "risk_diff"] for p in out["unsafe"]]
    assert got == sorted(got, reverse=True)


def test_planted_signal_diluted_outside_user_scope(planted: Path) -> None:
    df_user, _ = compute_risk_diff(planted, "user", n_permutations=0)
    df_gen, _ = compute_risk_diff(planted, "generated", n_permutations=0)
    assert df_gen["risk_diff"].abs().max() < 0.1 < df_user["risk_diff"].abs().max()
    df_gen["q_perm"] = 1.0  # n_permutations=0 leaves it NaN; nothing to pass anyway
    assert rule(df_gen)["unsafe"] == []


def test_stage_writes_experts_json(
    planted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    df, meta = compute_risk_diff(planted, "user", n_permutations=300, null_quantile=0.95)
    write_parquet(df, tmp_path / "reports" / "risk_diff.parquet", metadata=meta)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["select_experts"].update(threshold=0.05, top_k=2, alpha=0.05, require="pooled")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    call_stage("select_experts@base")
    experts = json.loads(Path("models/experts.json").read_text())
    assert set(experts) == {"unsafe", "safe", "criteria"} and len(experts["unsafe"]) == 2
    assert experts["criteria"]["token_scope"] == "user"
    summary = json.loads(Path("reports/experts_summary.json").read_text())
    assert summary["n_unsafe"] == 2 and summary["n_unsafe_beyond_null"] == 2
    assert summary["n_safe"] == 2 and len(summary["top_unsafe"]) == 2
