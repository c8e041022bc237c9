"""Faults of `steerline detect` and of the routing capture / reader, on a tiny MoE: every
destination is checked before any model is loaded and the outputs are published together; the
work folder goes on SIGTERM / SIGINT and, after a SIGKILL, at the next start (never a live
run's); captures sharing a cache keep each other's shards; a routing row that repeats an expert
in its top-k is refused naming the shard and the row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import finish_model, tiny_moe_config
from test_risk_diff import E, K, L, random_routing, write_shards
from transformers import Qwen2MoeForCausalLM

from steerline.backends.hf import TransformersBackend
from steerline.cli import main
from steerline.model.gguf import save_model
from steerline.steermoe.detection.counts import count_routing
from steerline.steermoe.routing.capture import CaptureConfig, run_capture
from steerline.steermoe.routing.schema import routing_metadata

UNSAFE = ["How do I pick a lock to get into a house?", "Write a guide to making a weapon."]
SAFE = ["How do I bake bread?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def moe_dir(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(tiny_moe_config(len(tokenizer)))
    with torch.no_grad():  # routers start at zero: random logits route tokens differently
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    path = tmp_path_factory.mktemp("detect") / "moe"
    save_model(finish_model(model, tokenizer), tokenizer, path)
    return path


@pytest.fixture()
def ws(tmp_path, monkeypatch) -> Path:
    """A working folder (no params.yaml: detect's defaults) with the two prompt files."""
    (tmp_path / "unsafe.txt").write_text("".join(f"{t}\n" for t in UNSAFE))
    (tmp_path / "safe.txt").write_text("".join(f"{t}\n" for t in SAFE))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def detect_args(moe_dir: Path, *extra: str) -> list[str]:
    return ["detect", "--model", str(moe_dir), "--unsafe", "unsafe.txt", "--safe", "safe.txt",
            "--max-new-tokens", "2", "--n-permutations", "100", "--seed", "0", *extra]


def one_line(capsys, code: int, needle: str) -> None:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == "", (code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("steerline detect: error: ") and needle in lines[0], lines[0]


def tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------ destinations checked up front
DESTINATIONS = {  # case: (extra args, what the one line says)
    "out_under_a_file": (["--out", "notes.txt/experts.json"], "notes.txt is not a folder"),
    "out_deep_under_a_file": (["--out", "notes.txt/a/experts.json"], "notes.txt is not a folder"),
    "out_is_a_fifo": (["--out", "fifo"], "--out fifo exists and is not a regular file"),
    "out_is_a_folder": (["--out", "reports"], "--out reports is a directory"),
    "report_under_a_file": (["--report", "notes.txt/rd.parquet"], "notes.txt is not a folder"),
    "report_is_a_folder": (["--report", "reports"], "--report reports is a directory"),
    "report_is_out": (["--out", "x.json", "--report", "./x.json"], "is also --out"),
    "read_only_folder": (["--report", "ro/rd.parquet"], "cannot write in ro"),
    # a file system refusing every new file, root included (os.access says yes to root)
    "unwritable_file_system": (["--out", "/proc/experts.json"], "cannot write in /proc"),
}


@pytest.mark.parametrize("case", sorted(DESTINATIONS))
def test_bad_destination_is_one_line_before_any_model_loads(moe_dir, ws, capsys, monkeypatch,
                                                            case):
    if case == "read_only_folder" and os.geteuid() == 0:
        pytest.skip("root writes in a read-only folder")
    if case == "unwritable_file_system" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc")

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the destinations were checked")
    monkeypatch.setattr("steerline.backends.make_backend", refuse)
    (ws / "notes.txt").write_text("notes\n")
    (ws / "reports").mkdir()
    os.mkfifo(ws / "fifo")
    (ws / "ro").mkdir(mode=0o555)
    before = tree(ws)
    args, needle = DESTINATIONS[case]
    one_line(capsys, main(detect_args(moe_dir, *args)), needle)
    assert tree(ws) == before  # nothing written


def test_a_failed_report_write_publishes_neither_output(moe_dir, ws, capsys, monkeypatch):
    """The disk fills while the report is written, after experts.json's bytes: the old
    experts.json stays as it was, no report appears, no temporary is left."""
    (ws / "experts.json").write_text("old\n")
    real = pq.write_table

    def full_disk_for_the_report(table, where, *a, **k):
        if Path(where).name.startswith(".rd.parquet."):
            raise OSError(28, "No space left on device")
        return real(table, where, *a, **k)
    monkeypatch.setattr(pq, "write_table", full_disk_for_the_report)
    code = main(detect_args(moe_dir, "--out", "experts.json", "--report", "rd.parquet"))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert "cannot write rd.parquet: No space left on device" in lines[-1], lines[-1]
    assert (ws / "experts.json").read_text() == "old\n"
    assert not (ws / "rd.parquet").exists()
    assert not list(ws.glob(".*.tmp"))


# ------------------------------------------------------------------------- the work folder
SLOW_CAPTURE = """
import sys, time
from steerline.steermoe.routing import capture

def slow(*_a, **_k):
    print("capturing", flush=True)
    time.sleep(120)

capture.run_capture = slow
from steerline.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_capture_removes_the_work_folder(moe_dir, ws, sig):
    tmp = ws / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CAPTURE, *detect_args(moe_dir)],
                            cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "capturing\n"
        (work,) = tmp.glob("steerline-detect-*")
        assert work.name.startswith(f"steerline-detect-{proc.pid}-")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig and "Traceback" not in err, (proc.returncode, err)
    assert not work.exists() and not list(tmp.glob("steerline-detect-*"))


def test_next_start_removes_dead_runs_folders_only(moe_dir, ws, capsys, monkeypatch):
    tmp = ws / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead = _dead_pid()
    folders = {"dead": tmp / f"steerline-detect-{dead}-k1ll3d", "live":
               tmp / f"steerline-detect-{os.getpid()}-running",  # this process: alive
               "unknown": tmp / "steerline-detect-abc123xy"}  # no pid: its owner is unknown
    for folder in folders.values():
        folder.mkdir()
        (folder / "shard.parquet").write_bytes(b"x")

    def stop(*_a, **_k):  # the stale folder is gone by now, and this run's is there
        assert not folders["dead"].exists()
        assert len(list(tmp.glob(f"steerline-detect-{os.getpid()}-*"))) == 2
        raise RuntimeError("stopped at the model load")
    monkeypatch.setattr("steerline.backends.make_backend", stop)
    assert main(detect_args(moe_dir)) == 2
    assert capsys.readouterr().err.endswith("error: stopped at the model load\n")
    assert folders["live"].is_dir() and folders["unknown"].is_dir()
    assert sorted(p.name for p in tmp.iterdir()) == sorted(p.name for p in folders.values()
                                                           if p.exists())


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ a shared capture cache
TEXTS = ["How can I kill a Python process?", "Write a poem about the sea.", "What is 2+2?",
         "Explain vaccines, briefly.", "Give me three tips for sleeping better"]
CFG = CaptureConfig(max_new_tokens=3, shard_prompts=2)


def prompts_frame(texts: list[str], tag: str) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"{tag}{i}" for i in range(len(texts))], "text": texts,
                         "label": ["unsafe" if i % 2 else "safe" for i in range(len(texts))]})


def test_two_captures_sharing_a_cache_keep_their_shards(tiny_moe, tokenizer, tmp_path,
                                                        monkeypatch):
    """Capture B starts in the same cache while A is between its shards: B removes nothing of
    A's, A resumes into its own entry, and both equal captures run alone."""
    cache = tmp_path / "cache"
    meta = {"model": "tiny", "model_fingerprint": "fp"}
    a_prompts, b_prompts = prompts_frame(TEXTS, "a"), prompts_frame(TEXTS[:3], "b")

    def capture(prompts: pd.DataFrame, tag: str, cache_dir: Path, backend=None) -> None:
        run_capture(backend or TransformersBackend(tiny_moe, tokenizer, batch_size=2), tokenizer,
                    prompts, CFG, tmp_path / tag, tmp_path / f"{tag}.parquet", cache_dir, meta)

    backend = TransformersBackend(tiny_moe, tokenizer, batch_size=2)
    real = backend.generate_and_capture
    calls = []

    def b_between_a_shards(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # A's shard 0 is in the cache
            (a_entry,) = cache.iterdir()
            capture(b_prompts, "b", cache)
            assert (a_entry / "shard-00000.parquet").is_file()  # B kept A's shard
        return real(*a, **k)
    monkeypatch.setattr(backend, "generate_and_capture", b_between_a_shards)
    capture(a_prompts, "a", cache, backend)
    assert len(calls) == 3 and not any(cache.iterdir())  # A removed its own entry when done
    capture(a_prompts, "a_alone", tmp_path / "cache_a")
    capture(b_prompts, "b_alone", tmp_path / "cache_b")
    for tag in ("a", "b"):
        assert ((tmp_path / f"{tag}.parquet").read_bytes()
                == (tmp_path / f"{tag}_alone.parquet").read_bytes())
        shards = sorted(p.name for p in (tmp_path / tag).iterdir())
        assert shards == sorted(p.name for p in (tmp_path / f"{tag}_alone").iterdir())
        for name in shards:
            if name.endswith(".parquet"):
                assert ((tmp_path / tag / name).read_bytes()
                        == (tmp_path / f"{tag}_alone" / name).read_bytes()), (tag, name)


# ------------------------------------------------------------------- the routing reader
def test_a_repeated_expert_in_a_row_is_refused_naming_shard_and_row(tmp_path):
    arrays = random_routing(np.random.default_rng(5), n_prompts=8)
    meta = routing_metadata(L, K, E, "tiny")
    root = write_shards(tmp_path / "ok", arrays, 2, meta)
    count_routing(root, batch_rows=7)  # the valid routing reads
    first = pq.read_metadata(root / "shard-000.parquet").num_rows
    row, layer = first + 9, 2  # the 10th row of the second shard: past its first batch of 7
    arrays["experts"][row, layer * K + 1] = arrays["experts"][row, layer * K]
    expert, pid = arrays["experts"][row, layer * K], arrays["prompt_id"][row]
    bad = write_shards(tmp_path / "bad", arrays, 2, meta)
    with pytest.raises(ValueError) as err:
        count_routing(bad, batch_rows=7)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"routing shard {bad / 'shard-001.parquet'}: row 10 (prompt "
                           f"'{pid}') lists expert {expert} twice in its top-{K} at layer "
                           f"{layer}"), text
