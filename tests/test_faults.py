"""Crash and reproducibility tests of capture_routing and finetune_experts on a tiny MoE.

Each stage runs as the pipeline runs it (the stage script, in a workspace directory with its
own params.yaml, transformers backend). Clean runs happen in-process; the killed runs are
subprocesses that SIGKILL themselves at a named point (steerline.core.faults.kill_point), then the
stage is rerun. Every output must be byte-identical to a clean run's, with nothing left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import finish_model, tiny_moe_config
from stage_cmd import stage_argv
from transformers import Qwen2MoeForCausalLM

from steerline.core.faults import KILL_ENV
from steerline.model.gguf import save_model

REPO = Path(__file__).resolve().parents[1]
CAPTURE_OUTS = ["data/routing", "data/generations.parquet"]
FINETUNE_OUTS = ["models/moe_finetuned", "reports/finetune_experts"]


def tree_digest(root: Path, outs: list[str]) -> dict[str, str]:
    """{relative path: sha256} of every file under the given outputs."""
    out = {}
    for rel in outs:
        p = root / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    assert out, f"no outputs under {outs} in {root}"
    return out


def leftovers(root: Path) -> list[str]:
    """Temporaries and caches a finished stage must not leave."""
    found = [f.relative_to(root).as_posix() for f in root.rglob(".*.tmp")]
    for d in ("data/.capture_cache", "tmp/finetune_experts"):
        if (root / d).is_dir() and any((root / d).iterdir()):
            found.append(d)
    return found


def modes_ok(root: Path, outs: list[str]) -> bool:
    files = [f for rel in outs for f in ([root / rel] if (root / rel).is_file()
                                          else (root / rel).rglob("*"))]
    return all(stat.S_IMODE(f.stat().st_mode) == (0o755 if f.is_dir() else 0o644)
               for f in files)


def prompts() -> pd.DataFrame:
    rows = [(f"u{i}", f"Explain how to do harmful thing number {i}", "unsafe") for i in range(4)]
    rows += [(f"s{i}", f"Tell me one fact about animal number {i}", "safe") for i in range(4)]
    df = pd.DataFrame(rows, columns=["prompt_id", "text", "label"])
    df["split"], df["source"] = "detect", "tiny"
    return df


@pytest.fixture(scope="module")
def one_thread():
    """In-process and subprocess runs use one torch thread (the same float reductions)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def template(tmp_path_factory, tokenizer, one_thread) -> Path:
    """A workspace: tiny MoE in models/moe, safety prompts, experts.json, params.yaml."""
    ws = tmp_path_factory.mktemp("faults") / "template"
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(tiny_moe_config(len(tokenizer)))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    save_model(finish_model(model, tokenizer), tokenizer, ws / "models/moe")
    (ws / "data/prompts").mkdir(parents=True)
    prompts().to_parquet(ws / "data/prompts/safety.parquet", index=False)
    (ws / "models/experts.json").write_text(json.dumps(
        {"unsafe": [[0, 1], [2, 5]], "safe": [[1, 3]], "criteria": {"model": "models/moe"}}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["capture_routing"].update(backend="transformers",
                                     max_new_tokens=4, batch_size=2, shard_prompts=3)
    params["finetune_experts"].update(max_experts=None, lr=1e-2, epochs=2,
                                      batch_size=3, max_unsafe=None, max_safe=None,
                                      max_length=64, checkpoint_every=1)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


def copy_ws(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def run_inprocess(ws: Path, stage: str) -> None:
    cwd, argv = os.getcwd(), sys.argv
    os.chdir(ws)
    sys.argv = list(stage_argv(stage))
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        os.chdir(cwd)
        sys.argv = argv


def run_killed(ws: Path, stage: str, point: str) -> None:
    env = {**os.environ, KILL_ENV: point, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *stage_argv(stage)], cwd=ws,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


@pytest.fixture(scope="module")
def clean(template, tmp_path_factory):
    """Two independent clean runs of capture_routing then finetune_experts: their digests."""
    runs = []
    for i in range(2):
        ws = copy_ws(template, tmp_path_factory.mktemp("clean") / f"ws{i}")
        run_inprocess(ws, "capture_routing@base")
        run_inprocess(ws, "finetune_experts")
        runs.append(ws)
    return runs


def test_two_clean_runs_give_identical_bytes(clean):
    a, b = clean
    for outs in (CAPTURE_OUTS, FINETUNE_OUTS):
        assert tree_digest(a, outs) == tree_digest(b, outs)
        assert modes_ok(a, outs)
    assert leftovers(a) == []
    info = json.loads((a / "models/moe_finetuned/trained_experts.json").read_text())
    assert "seconds" not in info["training"] and "resumed_from_step" not in info["training"]
    timings = json.loads((a / "reports/timings/finetune_experts.json").read_text())
    assert timings["resumed_from_step"] == 0 and timings["train_seconds"] > 0


@pytest.mark.parametrize("point", ["capture:shard:0", "capture:publish"])
def test_capture_killed_then_rerun_gives_identical_bytes(template, clean, tmp_path, point):
    ws = copy_ws(template, tmp_path / "ws")
    run_killed(ws, "capture_routing@base", point)
    assert not (ws / "data/routing").exists()  # nothing published before the commit point
    run_inprocess(ws, "capture_routing@base")
    assert tree_digest(ws, CAPTURE_OUTS) == tree_digest(clean[0], CAPTURE_OUTS)
    assert leftovers(ws) == []


@pytest.mark.parametrize("point", ["finetune:checkpoint:2", "finetune:publish"])
def test_finetune_killed_then_resumed_gives_identical_bytes(clean, tmp_path, point):
    ws = copy_ws(clean[0], tmp_path / "ws")
    for rel in FINETUNE_OUTS:
        shutil.rmtree(ws / rel)
    run_killed(ws, "finetune_experts", point)
    assert not (ws / "models/moe_finetuned").exists()
    assert list((ws / "models").glob(".moe_finetuned.*.tmp")) or point != "finetune:publish"
    run_inprocess(ws, "finetune_experts")
    assert tree_digest(ws, FINETUNE_OUTS) == tree_digest(clean[0], FINETUNE_OUTS)
    assert leftovers(ws) == []  # the killed run's temporaries were removed by the rerun
    timings = json.loads((ws / "reports/timings/finetune_experts.json").read_text())
    steps = json.loads((ws / "models/moe_finetuned/trained_experts.json").read_text())
    total = steps["training"]["steps"]
    assert timings["resumed_from_step"] == (2 if point == "finetune:checkpoint:2" else total)
