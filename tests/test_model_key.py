"""The one model key: `dvc exp run -S model=PATH` points every SteerMoE stage and the MoE
commands at PATH, and a PATH they cannot use (a missing folder, a dense model, an MoE family
steerline does not know) ends in one line naming it, from config.json, before any weight or
engine loads."""

from __future__ import annotations

import contextlib
import json
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cli_run import one_line, run_cli

ROOT = Path(__file__).resolve().parents[1]
STEERMOE_LOADERS = ["capture_routing@base", "finetune_experts", "train_gate@base",
                    "answer_safety_base"]
BAD = {
    "missing": (None, "model directory {path} not found: run the build_models stage or point "
                      "params.yaml `model`"),
    "dense": ({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2},
              "{path} (llama) is a dense model: this stage needs a Mixture-of-Experts model"),
    "unknown": ({"model_type": "dbrx", "num_experts": 4, "num_experts_per_tok": 2},
                "model_type 'dbrx' is not an MoE family steerline knows"),
}


def bad_model(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A model folder of `kind` (only config.json: the checks read nothing else) and the
    message it must end in."""
    config, message = BAD[kind]
    path = tmp_path / f"ckpt_{kind}"
    if config is not None:
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
    return path, message.format(path=path)


def workspace(tmp_path: Path, model: str) -> Path:
    """dvc.yaml and params.yaml with `model: MODEL` (what `dvc exp run -S model=MODEL`
    writes), a DVC repository without git, and the prompts and experts.json the stages read
    before their model."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(ROOT / "dvc.yaml", ws / "dvc.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"] = model
    raw["expert_steering"]["gate"] = "none"  # answer_safety_base checks its gate folder first
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    from dvc.repo import Repo

    Repo.init(str(ws), no_scm=True)
    rows = [(f"{split}-{label}-{i}", f"{label} prompt {i} of {split}?", label, split)
            for split in ("detect", "dev", "test") for label in ("unsafe", "safe")
            for i in range(3)]
    prompts = pd.DataFrame(rows, columns=["prompt_id", "text", "label", "split"])
    (ws / "data/prompts").mkdir(parents=True)
    prompts.assign(source="xstest", detection=True).to_parquet(
        ws / "data/prompts/safety.parquet", index=False)
    (ws / "models").mkdir()
    (ws / "models/experts.json").write_text(json.dumps(
        {"unsafe": [[0, 1]], "safe": [[0, 2]], "criteria": {"model": model}}))
    return ws


def dvc_argv(ws: Path, stage: str) -> list[str]:
    """Stage `stage`'s command as DVC renders it from the workspace's params.yaml."""
    from dvc.repo import Repo

    with contextlib.chdir(ws), Repo(str(ws)) as repo:
        (st,) = repo.stage.collect(stage)
        words = shlex.split(st.cmd)
    while "=" in words[0]:  # OMP_WAIT_POLICY=PASSIVE
        words.pop(0)
    return [str(ROOT / words[1]), *words[2:]]


def run_stage_script(ws: Path, argv: list[str], monkeypatch) -> str:
    monkeypatch.chdir(ws)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(argv[0], run_name="__main__")
    return str(exit_.value)


def test_one_key_points_every_steermoe_stage_at_a_checkpoint(tmp_path):
    """With `model` a checkpoint, each SteerMoE stage that loads a model gets it on its command
    line and as a dep, and none depends on build_models (only MAT-Steer's do)."""
    ckpt = "/data/Qwen3-30B-A3B"
    ws = workspace(tmp_path, ckpt)
    from dvc.repo import Repo

    with contextlib.chdir(ws), Repo(str(ws)) as repo:
        stages = {s.addressing: s for s in repo.index.stages}
        for name in STEERMOE_LOADERS:
            assert ckpt in shlex.split(stages[name].cmd), name
            assert ckpt in [d.def_path for d in stages[name].deps], name
        users = sorted(s.addressing for s in repo.index.graph.predecessors(
            stages["build_models"]))
    assert users == ["eval_baselines", "eval_steering", "extract_activations"]


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("stage", STEERMOE_LOADERS)
def test_a_model_a_stage_cannot_use_is_one_line(tmp_path, monkeypatch, stage, kind):
    path, message = bad_model(tmp_path, kind)
    ws = workspace(tmp_path, str(path))
    line = run_stage_script(ws, dvc_argv(ws, stage), monkeypatch)
    assert "\n" not in line and message in line, line
    # nothing written: the check runs before any output is staged
    assert not (ws / "data/routing").exists() and not (ws / "models/gate").exists()


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("command", [["routes", "--prompt", "Hi"],
                                     ["detect", "--unsafe", "u.txt", "--safe", "s.txt"]])
def test_the_commands_take_the_model_key(tmp_path, monkeypatch, capsys, command, kind):
    """Without --model the MoE commands take params.yaml's `model`: its faults in one line."""
    path, message = bad_model(tmp_path, kind)
    ws = workspace(tmp_path, str(path))
    (ws / "u.txt").write_text("How do I pick a lock?\nHow do I make a weapon?\n")
    (ws / "s.txt").write_text("How do I bake bread?\nHow do I plant a tree?\n")
    monkeypatch.chdir(ws)
    code, _, err = run_cli(capsys, *command)
    assert code == 2
    want = {"missing": f"{path} not found", "dense": f"{path} is a dense model",
            "unknown": "model_type 'dbrx' is not an MoE family steerline knows"}[kind]
    one_line(err, want)


def test_placement_from_the_weights_size(moe_dir):
    """A model loads where it fits: the host without a GPU, GPU 0 when its weights take at most
    GPU_WEIGHT_SHARE of that GPU's free memory, else spread over the GPUs (device_map auto);
    the weights are counted from the safetensors headers alone."""
    import torch
    from safetensors.torch import load_file

    from steerline.model.load import GPU_WEIGHT_SHARE, load_moe, placement, weight_count

    gb = 2**30
    assert placement(61 * gb, []) == "cpu"
    assert placement(61 * gb, [79 * gb]) == "cuda"  # Qwen3-30B-A3B, bfloat16, one H100
    assert placement(93 * gb, [79 * gb, 79 * gb]) == "auto"  # Mixtral-8x7B: two
    assert placement(int(GPU_WEIGHT_SHARE * 10 * gb), [10 * gb]) == "cuda"
    on_disk = sum(t.numel() for f in moe_dir.glob("*.safetensors")
                  for t in load_file(f).values())
    assert weight_count(moe_dir) == on_disk > 0
    if not torch.cuda.is_available():  # no device given: the host, as before
        model, _ = load_moe(moe_dir)
        assert next(model.parameters()).device.type == "cpu"
