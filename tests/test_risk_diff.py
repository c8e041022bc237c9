"""risk_diff: vectorized streaming counts against a literal per-token loop, statistics (token
level and prompt level), contrasts, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from scipy.stats import false_discovery_control, norm
from stage_cmd import call_stage

from steerline.core.io import parquet_metadata, write_table
from steerline.steermoe.data.contrasts import agreement
from steerline.steermoe.detection import counts as routing_counts
from steerline.steermoe.detection.counts import count_routing
from steerline.steermoe.detection.inference import (
    bh_qvalues,
    bootstrap_ci,
    permutation_null,
    permutation_test,
    two_proportion_pvalue,
)
from steerline.steermoe.detection.risk_diff import compute_risk_diff
from steerline.steermoe.detection.table import (
    INFERENCE_COLUMNS,
    REPORT_COLUMNS,
    risk_diff_summary,
    risk_diff_table,
)
from steerline.steermoe.routing.manifest import write_routing_manifest
from steerline.steermoe.routing.reader import iter_routing_batches, read_routing_meta
from steerline.steermoe.routing.schema import ROUTING_SCHEMA, routing_metadata, routing_table

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
    """Split token rows into n_shards contiguous Parquet files at prompt boundaries (a prompt
    lies in one shard, as capture_routing writes them), then the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    starts = np.flatnonzero(arrays["position"] == 0)  # [n_prompts] first row of each prompt
    cuts = starts[np.linspace(0, len(starts), n_shards + 1).astype(int)[1:-1]]
    bounds = [0, *cuts.tolist(), len(arrays["position"])]
    for s in range(n_shards):
        part = {k: v[bounds[s] : bounds[s + 1]] for k, v in arrays.items()}
        write_table(routing_table(**part), root / f"shard-{s:03d}.parquet", meta)
    write_routing_manifest(root)
    return root


def prompt_table(arrays: dict[str, np.ndarray], xstest_unsafe_every: int = 2) -> pd.DataFrame:
    """The prompt table of random routing: every safe prompt is XSTest; of the unsafe ones every
    `xstest_unsafe_every`-th is XSTest, the others AdvBench."""
    first = arrays["position"] == 0
    ids, labels = arrays["prompt_id"][first], arrays["label"][first]
    unsafe_rank = np.cumsum(labels == "unsafe") - 1
    source = np.where(
        (labels == "safe") | (unsafe_rank % xstest_unsafe_every == 0), "xstest", "advbench"
    )
    return pd.DataFrame({"prompt_id": ids, "label": labels, "source": source})


@pytest.fixture(scope="module")
def routing_arrays() -> dict[str, np.ndarray]:
    return random_routing(np.random.default_rng(1), n_prompts=80)


@pytest.fixture(scope="module")
def routing_dir(
    tmp_path_factory: pytest.TempPathFactory, routing_arrays: dict[str, np.ndarray]
) -> Path:
    meta = routing_metadata(L, K, E, "tiny-moe", backend="transformers")
    return write_shards(tmp_path_factory.mktemp("routing"), routing_arrays, 4, meta)


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
    monkeypatch.setattr(routing_counts._PromptAccumulator, "initial_capacity", 3)  # regrow often
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
        assert row.p_token_z == pytest.approx(2 * (1 - norm.cdf(abs(z))), rel=1e-9, abs=1e-15)
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


# ---- prompt-level inference: permutation p-values and the bootstrap CI, against literal loops ----


def test_permutation_pvalues_equal_literal_loop(routing_dir: Path) -> None:
    counts = count_routing(routing_dir, "user")
    res = permutation_test(
        counts.counts, counts.tokens, counts.unsafe, 30, np.random.default_rng(5), chunk=7
    )
    observed = risk_diff_table(counts)["risk_diff"].abs().to_numpy()
    rng = np.random.default_rng(5)
    beyond = np.zeros_like(observed)
    for value in res.null_max:
        shuffled = counts.__class__(**{**counts.__dict__, "unsafe": rng.permutation(counts.unsafe)})
        rd = risk_diff_table(shuffled)["risk_diff"].abs().to_numpy()
        beyond += rd >= observed - 1e-12
        assert value == pytest.approx(rd.max(), rel=1e-12)
    assert res.p_value == pytest.approx((1 + beyond) / 31, rel=1e-12)
    again = permutation_test(
        counts.counts, counts.tokens, counts.unsafe, 30, np.random.default_rng(5), chunk=128
    )
    assert np.array_equal(res.p_value, again.p_value)  # whatever the chunk


def test_bootstrap_ci_equals_literal_resampling(routing_dir: Path) -> None:
    counts = count_routing(routing_dir, "user")
    mat, tok, case = counts.counts, counts.tokens, counts.unsafe
    low, high = bootstrap_ci(mat, tok, case, 25, np.random.default_rng(2), level=0.8, chunk=4)
    rng = np.random.default_rng(2)
    sides = [np.flatnonzero(case), np.flatnonzero(~case)]
    draws = []
    for _ in range(25):
        rates = []
        for idx in sides:
            pick = idx[rng.integers(0, len(idx), len(idx))]  # prompts drawn with replacement
            rates.append(mat[pick].sum(0) / tok[pick].sum())
        draws.append(rates[0] - rates[1])
    assert low == pytest.approx(np.quantile(draws, 0.1, axis=0), rel=1e-12, abs=1e-15)
    assert high == pytest.approx(np.quantile(draws, 0.9, axis=0), rel=1e-12, abs=1e-15)
    rd = risk_diff_table(counts)["risk_diff"].to_numpy()
    assert (low <= high).all() and ((low <= rd) | (rd <= high)).all()
    same = bootstrap_ci(mat, tok, case, 25, np.random.default_rng(2), level=0.8, chunk=128)
    assert np.array_equal(low, same[0]) and np.array_equal(high, same[1])


def test_report_prompt_level_columns(routing_dir: Path) -> None:
    df, meta = compute_risk_diff(routing_dir, n_permutations=50, null_quantile=0.95, seed=3,
                                 n_bootstrap=40)  # fmt: skip
    counts = count_routing(routing_dir, "user")
    res = permutation_test(
        counts.counts, counts.tokens, counts.unsafe, 50, np.random.default_rng([3, 0, 0])
    )
    assert np.array_equal(df["p_perm"], res.p_value)
    assert np.array_equal(df["q_perm"], bh_qvalues(res.p_value))
    assert float(meta["null_threshold"]) == np.quantile(res.null_max, 0.95)
    low, high = bootstrap_ci(
        counts.counts, counts.tokens, counts.unsafe, 40, np.random.default_rng([3, 0, 1])
    )
    assert np.array_equal(df["ci_low"], low) and np.array_equal(df["ci_high"], high)
    assert meta["n_bootstrap"] == "40" and meta["ci_level"] == "0.95"
    assert df[["p_perm", "ci_low"]].notna().all().all()
    off, _ = compute_risk_diff(routing_dir, n_permutations=0)
    assert off[["ci_low", "ci_high", "p_perm", "q_perm"]].isna().all().all()


def long_prompt_routing(n_long: int = 400, n_short: int = 40, n_user: int = 5) -> dict:
    """n_short prompts (half unsafe) of n_user user tokens that never route to expert 0 at layer
    0, plus one unsafe prompt of n_long user tokens that all do (other layers: random)."""
    rng = np.random.default_rng(7)
    lengths = [n_user] * n_short + [n_long]
    cols: dict[str, list] = {"prompt_id": [], "label": [], "user": []}
    for i, n in enumerate(lengths):
        long = i == n_short
        cols["prompt_id"] += ["long" if long else f"p{i:04d}"] * (n + 4)
        cols["label"] += ["unsafe" if long or i % 2 else "safe"] * (n + 4)
        cols["user"] += [False] * 3 + [True] * n + [False]
    n_tok = len(cols["user"])
    experts = np.argsort(rng.random((n_tok, L, E)), axis=-1)[..., :K]  # [N, L, K]
    # layer 0: experts 1..E-1 in random order for short prompts, (0, 1) for the long one
    experts[:, 0] = 1 + np.argsort(rng.random((n_tok, E - 1)), axis=-1)[:, :K]
    experts[np.asarray(cols["prompt_id"]) == "long", 0] = [0, 1]
    user = np.asarray(cols["user"])
    return {
        "prompt_id": np.asarray(cols["prompt_id"]),
        "label": np.asarray(cols["label"]),
        "position": np.concatenate([np.arange(n + 4) for n in lengths]),
        "token_id": rng.integers(0, 1000, n_tok),
        "is_generated": np.zeros(n_tok, bool),
        "is_template": ~user,
        "experts": experts.reshape(n_tok, L * K).astype(np.int16),
        "weights": np.full((n_tok, L * K), 1.0 / K, np.float16),
    }


def test_one_long_prompt_is_token_level_significant_only(tmp_path: Path) -> None:
    meta = routing_metadata(L, K, E, "m")
    root = write_shards(tmp_path / "routing", long_prompt_routing(), 2, meta)
    df, _ = compute_risk_diff(root, n_permutations=400, null_quantile=0.99, seed=0, n_bootstrap=200)
    row = df.set_index(["layer", "expert"]).loc[(0, 0)]
    # 400 / (400 + 20 * 5) unsafe tokens vs 0 safe ones: overwhelming if tokens were draws
    assert row["risk_diff"] == 0.8 and row["q_token_z"] < 1e-50
    # but they are one prompt: wherever a shuffle puts it, the difference is at least as large
    # (on the unsafe side: the same 0.8; on the safe side: -400 / (400 + 19 * 5))
    assert row["p_perm"] == 1.0 and row["q_perm"] == 1.0
    # about a third of the resamples leave that prompt out (risk_diff 0 there)
    assert row["ci_low"] == 0.0 and row["ci_high"] > 0.8


def test_contrast_columns_equal_subset_loops(
    routing_dir: Path, routing_arrays: dict[str, np.ndarray]
) -> None:
    prompts = prompt_table(routing_arrays)
    df, meta = compute_risk_diff(routing_dir, n_permutations=20, null_quantile=0.95,
                                 prompts=prompts, n_bootstrap=10)  # fmt: skip
    rows = [
        r
        for shard in sorted(routing_dir.glob("*.parquet"))
        for r in pq.read_table(shard).to_pylist()
        if in_scope(r, "user")
    ]
    source = dict(zip(prompts["prompt_id"], prompts["source"], strict=True))

    def rate(groups: set[tuple[str, str]]) -> np.ndarray:
        hits, n = np.zeros(L * E), 0
        for r in rows:
            if (source[r["prompt_id"]], r["label"]) in groups:
                n += 1
                for layer in range(L):
                    for e in r["experts"][layer * K : (layer + 1) * K]:
                        hits[layer * E + e] += 1
        return hits / n

    xs_unsafe, xs_safe, adv = ({("xstest", "unsafe")}, {("xstest", "safe")},
                               {("advbench", "unsafe")})  # fmt: skip
    matched = rate(xs_unsafe) - rate(xs_safe)
    style = rate(adv) - rate(xs_unsafe)
    assert df["matched_risk_diff"].to_numpy() == pytest.approx(matched, rel=1e-12, abs=1e-15)
    assert df["style_risk_diff"].to_numpy() == pytest.approx(style, rel=1e-12, abs=1e-15)
    pooled = rate(xs_unsafe | adv) - rate(xs_safe)
    assert df["risk_diff"].to_numpy() == pytest.approx(pooled, rel=1e-12, abs=1e-15)
    info = json.loads(meta["contrasts"])
    n_xs_unsafe = int(((prompts["source"] == "xstest") & (prompts["label"] == "unsafe")).sum())
    assert (
        info["matched"]["prompts_case"] == n_xs_unsafe
        and info["matched"]["prompts_reference"] == 40
    )
    assert (
        info["style"]["prompts_case"] == 40 - n_xs_unsafe and "null_threshold" not in info["style"]
    )
    summary = risk_diff_summary(df, meta)
    assert summary["significant"]["matched"]["q_perm"] == int((df["matched_q_perm"] <= 0.05).sum())
    assert summary["agreement"]["pooled_matched"] == agreement(pooled, matched)


def test_agreement_literal() -> None:
    a = np.array([0.5, 0.4, 0.3, -0.1, 0.0])
    b = np.array([0.1, 0.6, -0.2, 0.3, 0.05])
    out = agreement(a, b, top_n=2)
    # ranks a: 5 4 3 1 2, b: 3 5 1 4 2; sum d^2 = 18; rho = 1 - 6 * 18 / (5 * 24) = 0.1
    assert out == {"spearman": pytest.approx(0.1, rel=1e-12), "top2_overlap": 1}  # {0,1} & {1,3}
    assert agreement(a, a, top_n=3) == {"spearman": pytest.approx(1.0), "top3_overlap": 3}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("drop", "routed prompt 'p0079' is not in the prompt table"),
        ("relabel", "prompt 'p0000' is 'safe' in the routing but 'unsafe'"),
        ("no_advbench", "contrast 'style' has no in-scope prompts on its case side"),
        ("no_source", "no column 'source'"),
    ],
)
def test_bad_prompt_table(
    routing_dir: Path, routing_arrays: dict[str, np.ndarray], change: str, needle: str
) -> None:
    prompts = prompt_table(routing_arrays)
    if change == "drop":
        prompts = prompts[prompts["prompt_id"] != "p0079"]
    elif change == "relabel":
        prompts.loc[prompts["prompt_id"] == "p0000", "label"] = "unsafe"
    elif change == "no_advbench":
        prompts["source"] = "xstest"
    else:
        prompts = prompts.drop(columns="source")
    with pytest.raises(ValueError, match=needle):
        compute_risk_diff(routing_dir, n_permutations=0, prompts=prompts)


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
        ids = np.char.add(f"s{s}-", arrays["prompt_id"])  # a prompt lies in one shard
        write_table(routing_table(**{**arrays, "prompt_id": ids}), tmp_path / f"{s}.parquet", meta)
    write_routing_manifest(tmp_path)
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
        write_routing_manifest(root)
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
    "empty": "manifest.json is missing",
    "missing": "no routing shards",
    "one_class": "only 'safe' prompts",
    "no_unsafe_in_scope": "no unsafe tokens in scope 'generated'",
    "missing_column": "no column 'is_template'",
    "model_mismatch": "z.parquet: not listed in manifest.json",  # a shard of another capture
    "mixed_labels": "prompt 'p0001'.*both labels",
    "bad_expert": "outside \\[0, n_experts=6\\)",
    "bad_width": "length 5.*n_layers\\*top_k",
}


STAGE_RISK_DIFF = {"n_permutations": 40, "null_quantile": 0.95, "n_bootstrap": 30, "ci_level": 0.9}


def stage_workdir(tmp_path: Path, scope: str, prompts: pd.DataFrame | None = None) -> None:
    """params.yaml (the repository's, with a small risk_diff section) and a prompt table."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = 0
    params["risk_diff"].update(token_scope=scope, **STAGE_RISK_DIFF)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    if prompts is None:
        prompts = pd.DataFrame({"prompt_id": ["p0000"], "label": ["safe"], "source": ["xstest"]})
    (tmp_path / "data" / "prompts").mkdir(parents=True, exist_ok=True)
    prompts.to_parquet(tmp_path / "data" / "prompts" / "safety.parquet")


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
        call_stage("risk_diff@base")
    assert not (tmp_path / "reports").exists()


def test_stage_writes_all_outputs(
    routing_dir: Path,
    routing_arrays: dict[str, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "routing").symlink_to(routing_dir)
    prompts = prompt_table(routing_arrays)
    stage_workdir(tmp_path, "all", prompts)
    monkeypatch.chdir(tmp_path)
    call_stage("risk_diff@base")
    df = pd.read_parquet("reports/risk_diff.parquet")
    meta = parquet_metadata("reports/risk_diff.parquet")
    repo = yaml.safe_load((ROOT / "params.yaml").read_text())["risk_diff"]
    p_keys = {k: repo[k] for k in ("p_method", "p_max_permutations", "p_stop_exceedances")}
    expected, expected_meta = compute_risk_diff(
        routing_dir, "all", prompts=prompts, seed=0, **STAGE_RISK_DIFF, **p_keys
    )
    pd.testing.assert_frame_equal(df, expected)
    assert meta == expected_meta
    assert list(df.columns) == [
        *REPORT_COLUMNS,
        *(f"matched_{c}" for c in INFERENCE_COLUMNS),
        "style_risk_diff",
    ]
    assert meta["token_scope"] == "all" and meta["n_permutations"] == "40"
    assert {"n_layers", "top_k", "n_experts", "model", "null_quantiles", "contrasts"} <= set(meta)
    summary = json.loads(Path("reports/risk_diff_summary.json").read_text())
    assert summary == risk_diff_summary(df, meta)
    assert summary["tokens"]["safe"] == int(df["n_safe"].iloc[0]) and len(summary["top"]) == 5
    assert summary["null"]["n_beyond"] == int(meta["n_beyond_null"])
    assert set(summary["agreement"]) == {"pooled_matched", "pooled_style", "matched_style"}
    assert Path("reports/risk_diff_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot = pd.read_csv("reports/risk_diff_top.csv")
    assert list(plot.columns[:4]) == ["pair", "layer", "expert", "risk_diff"] and len(plot) == 18
    assert plot["risk_diff"].is_monotonic_decreasing
    assert not list(Path("reports").glob(".*tmp"))  # no leftovers from atomic writes


def test_dense_layers_keep_the_models_layer_numbers(tmp_path: Path, routing_arrays) -> None:
    """A model whose layer 0 is dense routes on layers 1, 3, 4: the report names those."""
    from steerline.steermoe.detection.plots import heatmap_png

    meta = routing_metadata(L, K, E, "m", backend="transformers", moe_layers="[1, 3, 4]")
    root = write_shards(tmp_path / "routing", routing_arrays, 2, meta)
    df, out_meta = compute_risk_diff(root, n_permutations=0)
    assert sorted(set(df["layer"])) == [1, 3, 4]
    plain, _ = compute_risk_diff(
        write_shards(tmp_path / "plain", routing_arrays, 2,
                     routing_metadata(L, K, E, "m", backend="transformers")), n_permutations=0)
    assert sorted(set(plain["layer"])) == [0, 1, 2]
    np.testing.assert_array_equal(df["risk_diff"], plain["risk_diff"])  # only the names move
    assert heatmap_png(df, out_meta)[:4] == b"\x89PNG"
    bad = routing_metadata(L, K, E, "m", backend="transformers", moe_layers="[1, 1, 4]")
    with pytest.raises(ValueError, match="must list 3 increasing layer numbers"):
        compute_risk_diff(write_shards(tmp_path / "bad", routing_arrays, 2, bad),
                          n_permutations=0)


def test_own_sources_have_the_pooled_contrast_only(
    routing_dir: Path, routing_arrays: dict[str, np.ndarray]
) -> None:
    """A table of a user's own sources (none named xstest / advbench) gets the pooled contrast,
    equal to the one without a table, and select_experts' require: both names the fix."""
    from steerline.steermoe.detection.select_experts import select_experts

    prompts = prompt_table(routing_arrays)
    prompts["source"] = np.where(prompts["label"] == "unsafe", "pirate", "plain")
    opts = {"n_permutations": 20, "null_quantile": 0.95, "seed": 0}
    df, meta = compute_risk_diff(routing_dir, prompts=prompts, **opts)
    alone, _ = compute_risk_diff(routing_dir, **opts)
    assert list(json.loads(meta["contrasts"])) == ["pooled"]
    pd.testing.assert_frame_equal(df, alone)
    with pytest.raises(ValueError, match="set select_experts.require: pooled"):
        select_experts(df, threshold=0.05, top_k=10, alpha=0.05, require="both")


def test_spearman_and_normal_tail_equal_scipy_stats():
    """contrasts.spearman and two_proportion_pvalue's normal tail (scipy.special.ndtr) give
    scipy.stats' spearmanr and norm.sf value for value, ties, float32, NaN and constant inputs
    included (the risk_diff stage no longer imports scipy.stats)."""
    import warnings

    from scipy.special import ndtr
    from scipy.stats import norm, spearmanr

    from steerline.steermoe.data.contrasts import average_ranks, spearman

    rng = np.random.default_rng(0)
    cases = []
    for i in range(400):
        n = int(rng.integers(2, 300))
        a, b = rng.normal(size=n), rng.normal(size=n)
        if i % 4 == 1:  # ties
            a, b = np.round(a, 1), np.round(b, 0)
        elif i % 4 == 2:
            a = rng.integers(0, 3, n).astype(float)
            b = a + rng.integers(0, 2, n)
        elif i % 4 == 3:
            a, b = a.astype(np.float32), b.astype(np.float32)
        cases.append((a, b))
    cases += [(np.ones(5), np.arange(5.0)), (np.array([1.0, np.nan, 3.0]), np.arange(3.0)),
              (np.array([2.0]), np.array([1.0]))]
    for a, b in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = float(spearmanr(a, b).statistic)
        got = spearman(a, b)
        assert got == want or (np.isnan(got) and np.isnan(want)), (a, b)
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    z = np.concatenate([rng.normal(size=10_000) * 6, [0.0, 40.0, np.inf]])
    assert np.array_equal(ndtr(-np.abs(z)), norm.sf(np.abs(z)))
