"""risk_diff: vectorized streaming counts against a literal per-token loop, statistics, errors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import false_discovery_control, norm

from steerline.steermoe import risk_diff
from steerline.io import parquet_metadata, write_table
from steerline.steermoe.risk_diff import (
    REPORT_COLUMNS,
    bh_qvalues,
    compute_risk_diff,
    count_routing,
    permutation_null,
    risk_diff_table,
    two_proportion_pvalue,
)
from steerline.steermoe.routing_schema import (
    ROUTING_SCHEMA,
    iter_routing_batches,
    read_routing_meta,
    routing_metadata,
    routing_table,
)

ROOT = Path(__file__).resolve().parents[1]
L, K, E = 3, 2, 6


def random_routing(
    rng: np.random.Generator,
    n_prompts: int,
    n_layers: int = L,
    top_k: int = K,
    n_experts: int = E,
    labels: tuple[str, ...] = ("safe", "unsafe"),
    max_generated: int = 6,
) -> dict[str, np.ndarray]:
    """Per-token arrays for random prompts: 3 template tokens, user text, 1 template, generation."""
    cols: dict[str, list] = {k: [] for k in ROUTING_SCHEMA.names if k not in ("experts", "weights")}
    for i in range(n_prompts):
        n_user = int(rng.integers(1, 12))
        n_gen = int(rng.integers(0, max_generated + 1))
        n = 3 + n_user + 1 + n_gen
        cols["prompt_id"] += [f"p{i:04d}"] * n
        cols["label"] += [labels[i % len(labels)]] * n
        cols["position"] += list(range(n))
        cols["token_id"] += rng.integers(0, 1000, n).tolist()
        cols["is_generated"] += [False] * (n - n_gen) + [True] * n_gen
        cols["is_template"] += [True] * 3 + [False] * n_user + [True] + [False] * n_gen
    n_tok = len(cols["position"])
    # distinct top-k per (token, layer): first k of a random permutation of the experts
    experts = np.argsort(rng.random((n_tok, n_layers, n_experts)), axis=-1)[..., :top_k]
    out = {k: np.asarray(v) for k, v in cols.items()}
    out["experts"] = experts.reshape(n_tok, n_layers * top_k).astype(np.int16)
    out["weights"] = np.full(out["experts"].shape, 1.0 / top_k, np.float16)
    return out


def write_shards(
    root: Path, arrays: dict[str, np.ndarray], n_shards: int, meta: dict[str, str]
) -> Path:
    """Split token rows into n_shards contiguous Parquet files (prompts may straddle shards)."""
    root.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(arrays["position"]), n_shards + 1).astype(int)
    for s in range(n_shards):
        part = {k: v[bounds[s] : bounds[s + 1]] for k, v in arrays.items()}
        write_table(routing_table(**part), root / f"shard-{s:03d}.parquet", meta)
    return root


@pytest.fixture(scope="module")
def routing_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(1)
    arrays = random_routing(rng, n_prompts=80)
    meta = routing_metadata(L, K, E, "tiny-moe", backend="transformers")
    return write_shards(tmp_path_factory.mktemp("routing"), arrays, 4, meta)


def in_scope(row: dict, scope: str) -> bool:
    if scope == "all":
        return True
    if scope == "generated":
        return row["is_generated"]
    return not row["is_generated"] and not row["is_template"]


def loop_reference(routing: Path, scope: str) -> tuple[dict, dict]:
    """Literal per-token loop: a[label][layer][expert] and n[label]."""
    a = {lab: [[0] * E for _ in range(L)] for lab in ("safe", "unsafe")}
    n = {"safe": 0, "unsafe": 0}
    for shard in sorted(routing.glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            if not in_scope(row, scope):
                continue
            n[row["label"]] += 1
            for layer in range(L):
                for e in row["experts"][layer * K : (layer + 1) * K]:
                    a[row["label"]][layer][e] += 1
    return a, n


@pytest.mark.parametrize("scope", ["user", "generated", "all"])
def test_matches_per_token_loop_exactly(routing_dir: Path, scope: str) -> None:
    df, meta = compute_risk_diff(routing_dir, token_scope=scope, n_permutations=0)
    a, n = loop_reference(routing_dir, scope)
    assert list(df.columns) == list(REPORT_COLUMNS)
    assert df[["layer", "expert"]].values.tolist() == [[x, e] for x in range(L) for e in range(E)]
    for row in df.itertuples():
        sa, ua = a["safe"][row.layer][row.expert], a["unsafe"][row.layer][row.expert]
        assert (row.a_safe, row.a_unsafe, row.n_safe, row.n_unsafe) == (
            sa,
            ua,
            n["safe"],
            n["unsafe"],
        )
        assert row.a_safe_n == sa / n["safe"] and row.a_unsafe_n == ua / n["unsafe"]
        assert row.risk_diff == ua / n["unsafe"] - sa / n["safe"]
    assert meta["token_scope"] == scope and meta["model"] == "tiny-moe"
    assert meta["n_tokens_safe"] == str(n["safe"]) and meta["backend"] == "transformers"
    # every token has k distinct experts per layer: counts per layer sum to k * n
    sums = df.groupby("layer")[["a_safe", "a_unsafe"]].sum()
    assert (sums["a_safe"] == K * n["safe"]).all() and (sums["a_unsafe"] == K * n["unsafe"]).all()


def test_streaming_batch_size_does_not_change_results(routing_dir: Path) -> None:
    small = compute_risk_diff(routing_dir, n_permutations=20, null_quantile=0.95, batch_rows=7)
    large = compute_risk_diff(routing_dir, n_permutations=20, null_quantile=0.95, batch_rows=10**6)
    pd.testing.assert_frame_equal(small[0], large[0], check_exact=True)
    assert small[1] == large[1]
    batches = list(iter_routing_batches(routing_dir, ["prompt_id"], batch_rows=5))
    assert max(b.num_rows for b in batches) <= 5
    assert sum(b.num_rows for b in batches) == sum(
        pq.ParquetFile(p).metadata.num_rows for p in routing_dir.glob("*.parquet")
    )


def test_prompt_table_growth_does_not_change_results(
    routing_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = count_routing(routing_dir, "all")
    monkeypatch.setattr(risk_diff._PromptAccumulator, "initial_capacity", 3)  # regrow often
    got = count_routing(routing_dir, "all", batch_rows=50)
    assert got.prompt_ids == expected.prompt_ids
    for name in ("unsafe", "counts", "tokens"):
        assert np.array_equal(getattr(got, name), getattr(expected, name))


def test_per_prompt_counts_sum_to_pooled(routing_dir: Path) -> None:
    counts = count_routing(routing_dir, "user")
    assert counts.counts.shape == (len(counts.prompt_ids), L * E)
    assert len(set(counts.prompt_ids)) == len(counts.prompt_ids) == 80  # shards split prompts
    assert (counts.counts.reshape(-1, L, E).sum(-1) == K * counts.tokens[:, None]).all()


def test_pvalues_match_two_proportion_test_by_hand(routing_dir: Path) -> None:
    df, _ = compute_risk_diff(routing_dir, n_permutations=0)
    for row in df.iloc[[0, 5, 11, 17]].itertuples():
        p1, p2 = row.a_safe / row.n_safe, row.a_unsafe / row.n_unsafe
        pooled = (row.a_safe + row.a_unsafe) / (row.n_safe + row.n_unsafe)
        se = math.sqrt(pooled * (1 - pooled) * (1 / row.n_safe + 1 / row.n_unsafe))
        z = (p2 - p1) / se
        assert row.p_value == pytest.approx(2 * (1 - norm.cdf(abs(z))), rel=1e-9, abs=1e-15)
    # zero variance (never or always chosen) gives p = 1, not nan
    p = two_proportion_pvalue(np.array([0, 10, 3]), 10, np.array([0, 20, 0]), 20)
    assert p[0] == 1.0 and p[1] == 1.0 and 0 < p[2] < 1


def bh_literal(p: list[float]) -> list[float]:
    """q_i = min over j with p_j >= p_i of min(1, p_j * m / rank_j), rank by sorted order."""
    m = len(p)
    order = sorted(range(m), key=lambda i: (p[i], i))
    rank = {i: r + 1 for r, i in enumerate(order)}
    return [min(min(1.0, p[j] * m / rank[j]) for j in range(m) if rank[j] >= rank[i])
            for i in range(m)]  # fmt: skip


def test_bh_qvalues_literal_reference() -> None:
    assert bh_qvalues(np.array([0.01, 0.04, 0.03, 0.005])).tolist() == pytest.approx(
        [0.02, 0.04, 0.04, 0.02]
    )
    assert bh_qvalues(np.array([0.5, 0.9, 1.0])).tolist() == pytest.approx([1.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(60) ** 3, [0.2, 0.2, 0.0, 1.0]])
    q = bh_qvalues(p)
    assert q == pytest.approx(bh_literal(p.tolist()), rel=1e-12)
    assert q == pytest.approx(false_discovery_control(p, method="bh"), rel=1e-12)
    assert (q >= p).all() and (q <= 1).all()
    assert (np.diff(q[np.argsort(p, kind="stable")]) >= 0).all()  # monotone in p


def test_permutation_null_equals_recomputed_tables(routing_dir: Path) -> None:
    counts = count_routing(routing_dir, "user")
    null = permutation_null(counts, 12, seed=3, chunk=5)
    rng = np.random.default_rng(3)
    for value in null:
        shuffled = counts.__class__(**{**counts.__dict__, "unsafe": rng.permutation(counts.unsafe)})
        assert value == pytest.approx(risk_diff_table(shuffled)["risk_diff"].abs().max(), rel=1e-12)
    assert np.array_equal(null, permutation_null(counts, 12, seed=3, chunk=128))
    assert not np.array_equal(null, permutation_null(counts, 12, seed=4))


def test_null_metadata(routing_dir: Path) -> None:
    df, meta = compute_risk_diff(routing_dir, n_permutations=200, null_quantile=0.99, seed=0)
    quantiles = json.loads(meta["null_quantiles"])
    assert set(quantiles) == {"0.95", "0.99", "max"}  # 0.999 needs >= 1000 permutations
    thr = float(meta["null_threshold"])
    assert thr == quantiles["0.99"] and quantiles["0.95"] <= thr <= quantiles["max"]
    assert int(meta["n_beyond_null"]) == int((df["risk_diff"].abs() > thr).sum())
    with pytest.raises(ValueError, match="needs at least 1000 permutations"):
        compute_risk_diff(routing_dir, n_permutations=200, null_quantile=0.999)


def test_metadata_helpers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = random_routing(rng, 6)
    for s in range(2):  # per-shard keys may differ, everything else must agree
        meta = routing_metadata(L, K, E, "m", backend="transformers", shard_index=s)
        write_table(routing_table(**arrays), tmp_path / f"{s}.parquet", meta)
    meta = read_routing_meta(tmp_path)
    assert meta == {"n_layers": L, "top_k": K, "n_experts": E, "model": "m",
                    "backend": "transformers"}  # fmt: skip
    assert pq.read_schema(tmp_path / "0.parquet").remove_metadata().equals(ROUTING_SCHEMA)


# ---- bad inputs: one clear ValueError, and the stage writes nothing ----


def bad_case(tmp_path: Path, case: str) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "routing"
    meta = routing_metadata(L, K, E, "model-a")
    if case == "empty":
        root.mkdir(parents=True)
    elif case == "missing":
        pass
    elif case == "one_class":
        write_shards(root, random_routing(rng, 10, labels=("safe",)), 2, meta)
    elif case == "no_unsafe_in_scope":
        arrays = random_routing(rng, 10)
        unsafe = arrays["label"] == "unsafe"
        arrays["is_generated"][unsafe] = False  # unsafe prompts got no generation
        write_shards(root, arrays, 2, meta)
    elif case == "missing_column":
        table = routing_table(**random_routing(rng, 10)).drop_columns(["is_template"])
        root.mkdir(parents=True)
        write_table(table, root / "a.parquet", meta)
    elif case == "model_mismatch":
        write_shards(root, random_routing(rng, 10), 2, meta)
        arrays = random_routing(rng, 4)
        write_table(routing_table(**arrays), root / "z.parquet", routing_metadata(L, K, E, "b"))
    elif case == "mixed_labels":
        arrays = random_routing(rng, 4)
        arrays["label"][arrays["prompt_id"] == "p0001"] = "safe"
        arrays["label"][np.flatnonzero(arrays["prompt_id"] == "p0001")[0]] = "unsafe"
        write_shards(root, arrays, 1, meta)
    elif case == "bad_expert":
        arrays = random_routing(rng, 4)
        arrays["experts"][3, 1] = E
        write_shards(root, arrays, 1, meta)
    elif case == "bad_width":
        arrays = random_routing(rng, 4)
        arrays["experts"], arrays["weights"] = arrays["experts"][:, :-1], arrays["weights"][:, :-1]
        write_shards(root, arrays, 1, meta)
    return root


BAD = {
    "empty": "no routing shards",
    "missing": "no routing shards",
    "one_class": "only 'safe' prompts",
    "no_unsafe_in_scope": "no unsafe tokens in scope 'generated'",
    "missing_column": "no column 'is_template'",
    "model_mismatch": "model='b'.*model='model-a'.*rerun capture_routing",
    "mixed_labels": "prompt 'p0001'.*both labels",
    "bad_expert": "outside \\[0, n_experts=6\\)",
    "bad_width": "length 5.*n_layers\\*top_k",
}


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_workdir(tmp_path: Path, scope: str) -> None:
    (tmp_path / "params.yaml").write_text(
        f"seed: 0\nrisk_diff:\n  token_scope: {scope}\n  n_permutations: 40\n"
        "  null_quantile: 0.95\nselect_experts:\n  threshold: 0.05\n  top_k: 5\n  alpha: 0.05\n"
    )


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_clear_error_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    root = bad_case(tmp_path / "data", case)
    scope = "generated" if case == "no_unsafe_in_scope" else "user"
    with pytest.raises(ValueError, match=BAD[case]):
        compute_risk_diff(root, token_scope=scope, n_permutations=10, null_quantile=0.9)
    stage_workdir(tmp_path, scope)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=BAD[case]):
        load_stage("risk_diff").main()
    assert not (tmp_path / "reports").exists()


def test_stage_writes_all_outputs(
    routing_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "routing").symlink_to(routing_dir)
    stage_workdir(tmp_path, "all")
    monkeypatch.chdir(tmp_path)
    load_stage("risk_diff").main()
    df = pd.read_parquet("reports/risk_diff.parquet")
    meta = parquet_metadata("reports/risk_diff.parquet")
    expected, _ = compute_risk_diff(routing_dir, "all", n_permutations=40, null_quantile=0.95)
    pd.testing.assert_frame_equal(df, expected)
    assert meta["token_scope"] == "all" and meta["n_permutations"] == "40"
    assert {"n_layers", "top_k", "n_experts", "model", "null_quantiles"} <= set(meta)
    summary = json.loads(Path("reports/risk_diff_summary.json").read_text())
    assert summary["tokens"]["safe"] == int(df["n_safe"].iloc[0]) and len(summary["top"]) == 5
    assert summary["null"]["n_beyond"] == int(meta["n_beyond_null"])
    assert Path("reports/risk_diff_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot = pd.read_csv("reports/risk_diff_top.csv")
    assert list(plot.columns[:4]) == ["pair", "layer", "expert", "risk_diff"] and len(plot) == 18
    assert plot["risk_diff"].is_monotonic_decreasing
    assert not list(Path("reports").glob(".*tmp"))  # no leftovers from atomic writes
