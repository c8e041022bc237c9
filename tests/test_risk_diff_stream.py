"""risk_diff streaming at scale: results independent of batch size, counting path, row order and
column blocks; the background SHA-256 check still decides the error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from test_risk_diff import E, K, L, in_scope, prompt_table, random_routing, write_shards

from steerline.steermoe.detection import counts as routing_counts
from steerline.steermoe.detection import inference as prompt_inference
from steerline.steermoe.detection.counts import count_batches, count_routing
from steerline.steermoe.detection.risk_diff import compute_risk_diff
from steerline.steermoe.routing.schema import routing_metadata, routing_table


def loop_per_prompt(arrays: dict[str, np.ndarray], scope: str) -> dict[str, tuple]:
    """{prompt_id: ([L*E] counts, in-scope tokens, label)}, literally, token by token."""
    out: dict[str, tuple] = {}
    for i in range(len(arrays["position"])):
        row = {k: arrays[k][i] for k in ("prompt_id", "label", "is_generated", "is_template")}
        if not in_scope(row, scope):
            continue
        counts, n, _ = out.get(row["prompt_id"], ([0] * (L * E), 0, row["label"]))
        for layer in range(L):
            for e in arrays["experts"][i][layer * K : (layer + 1) * K]:
                counts[layer * E + int(e)] += 1
        out[row["prompt_id"]] = (counts, n + 1, row["label"])
    return out


def assert_counts_equal(got: routing_counts.PromptCounts, ref: dict[str, tuple]) -> None:
    assert sorted(got.prompt_ids) == sorted(ref)
    for i, pid in enumerate(got.prompt_ids):
        counts, n, label = ref[pid]
        assert got.counts[i].tolist() == counts and got.tokens[i] == n
        assert bool(got.unsafe[i]) == (label == "unsafe")


@pytest.fixture(scope="module")
def long_arrays() -> dict[str, np.ndarray]:
    """Prompts with up to 80 generated tokens: whole-batch batches take the per-prompt path."""
    return random_routing(np.random.default_rng(7), n_prompts=24, max_generated=80)


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory: pytest.TempPathFactory, long_arrays) -> Path:
    meta = routing_metadata(L, K, E, "tiny-moe", backend="transformers")
    return write_shards(tmp_path_factory.mktemp("long"), long_arrays, 3, meta)


@pytest.mark.parametrize("scope", ["user", "generated", "all"])
def test_batch_n_equals_batch_1_and_the_loop(long_dir: Path, long_arrays, scope: str) -> None:
    ref = loop_per_prompt(long_arrays, scope)
    one = count_routing(long_dir, scope, batch_rows=1)  # one row per batch
    assert_counts_equal(one, ref)
    for rows in (2, 13, 64, 10**6):  # 10**6: each shard in one batch (per-prompt runs)
        got = count_routing(long_dir, scope, batch_rows=rows)
        assert got.prompt_ids == one.prompt_ids
        for name in ("counts", "tokens", "unsafe"):
            assert np.array_equal(getattr(got, name), getattr(one, name)), (rows, name)


def test_both_counting_paths_agree(long_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    per_prompt = count_routing(long_dir, "all", batch_rows=10**6)
    monkeypatch.setattr(routing_counts, "_MIN_RUN", 10**9)  # force the whole-batch bincount
    monkeypatch.setattr(routing_counts, "_MAX_BINS", 2 * L * E)  # in groups of two prompts
    whole = count_routing(long_dir, "all", batch_rows=10**6)
    assert np.array_equal(per_prompt.counts, whole.counts)


def test_full_report_batch_1_equals_one_batch(long_dir: Path, long_arrays) -> None:
    prompts = prompt_table(long_arrays)
    kw = dict(n_permutations=30, null_quantile=0.9, n_bootstrap=20, prompts=prompts, seed=3)
    small = compute_risk_diff(long_dir, "all", batch_rows=1, **kw)
    large = compute_risk_diff(long_dir, "all", batch_rows=10**6, **kw)
    pd.testing.assert_frame_equal(small[0], large[0], check_exact=True)
    assert small[1] == large[1]


@pytest.mark.parametrize("rows_per_batch", [5, 10**6])
def test_interleaved_prompts(long_arrays, rows_per_batch: int) -> None:
    """The contract does not order rows: a prompt's tokens may be spread over a batch."""
    order = np.random.default_rng(0).permutation(len(long_arrays["position"]))
    shuffled = {k: v[order] for k, v in long_arrays.items()}
    table = routing_table(**shuffled)
    batches = [("mem", b) for b in table.to_batches(max_chunksize=rows_per_batch)]
    got = count_batches(batches, {"n_layers": L, "top_k": K, "n_experts": E}, "all")
    assert_counts_equal(got, loop_per_prompt(long_arrays, "all"))


def test_column_blocks_and_row_subsets_change_nothing(
    long_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = count_routing(long_dir, "all")
    mat, tok = counts.counts, counts.tokens
    rows = np.flatnonzero(np.arange(len(tok)) % 3 != 0)  # a contrast over a subset of prompts
    case = counts.unsafe[rows]

    def run() -> tuple:
        perm = prompt_inference.permutation_test(
            mat, tok[rows], case, 50, np.random.default_rng(1), chunk=16, rows=rows
        )
        ci = prompt_inference.bootstrap_ci(
            mat, tok[rows], case, 40, np.random.default_rng(2), 0.9, chunk=16, rows=rows
        )
        return perm.p_value, perm.null_max, *ci

    one_block = run()
    copied = (  # the same on an explicit copy of the rows, one block
        prompt_inference.permutation_test(mat[rows], tok[rows], case, 50,
                                          np.random.default_rng(1)),
        prompt_inference.bootstrap_ci(mat[rows], tok[rows], case, 40, np.random.default_rng(2),
                                      0.9),
    )  # fmt: skip
    monkeypatch.setattr(prompt_inference, "_BLOCK_BYTES", 1)  # 64-column blocks
    monkeypatch.setattr(prompt_inference, "_GATHER_ROWS", 3)  # rows converted in steps
    many_blocks = run()
    for a, b in zip(one_block, many_blocks, strict=True):
        assert np.array_equal(a, b)
    expect = (copied[0].p_value, copied[0].null_max, *copied[1])
    for a, b in zip(one_block, expect, strict=True):
        assert np.array_equal(a, b)


def test_changed_shard_reports_the_hash_error(tmp_path: Path, long_arrays) -> None:
    """The SHA-256 check runs beside the counting; a shard changed in place (same size) that
    also breaks the Parquet read is still reported as changed, not as a read error."""
    root = write_shards(tmp_path / "routing", long_arrays, 2,
                        routing_metadata(L, K, E, "m", backend="transformers"))  # fmt: skip
    shard = sorted(root.glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[4 : len(data) // 2] = bytes(len(data) // 2 - 4)  # zero the column chunks, keep size
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="content differs from manifest.json"):
        count_routing(root, "all")


def test_prefetch_passes_errors_and_stops() -> None:
    def items():
        yield 1
        raise pa.ArrowInvalid("bad batch")

    got = []
    with pytest.raises(pa.ArrowInvalid, match="bad batch"):
        for x in routing_counts._prefetch(items()):
            got.append(x)
    assert got == [1]
    gen = routing_counts._prefetch(iter(range(10**6)))
    assert next(gen) == 0
    gen.close()  # stops the producer thread (joins it) without reading the rest


def test_keep_rows_compacts_in_place() -> None:
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 9, (40, 6)).astype(np.int32)
    keep = rng.random(37) < 0.6  # rows 37..39: capacity not yet used
    expected = counts[:37][keep].copy()
    got = routing_counts._keep_rows(counts, 37, keep, step=2)
    assert np.array_equal(got, expected) and np.shares_memory(got, counts)
    assert routing_counts._keep_rows(counts, 3, np.ones(3, bool)).base is counts  # all kept: a view
