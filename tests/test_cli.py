"""The `steerline` command on tiny models and small files: output checked against the library
(steerline.backends with the same steering), and bad input ends in one line naming the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from cli_run import one_line, run_cli
from conftest import finish_model, tiny_moe_config
from transformers import Qwen2MoeForCausalLM

from steerline.backends import ActivationSteering, Steering, make_backend
from steerline.cli import COMMANDS, main
from steerline.cli.common import CliError, parse_pairs
from steerline.cli.generate import side_by_side
from steerline.cli.routes import heat_map
from steerline.cli.stages import edges, read_stages
from steerline.core.chat import render_chat
from steerline.mat_steer.checkpoint import SteeringConfig, save_steering
from steerline.model.gguf import save_model
from steerline.steering.experts import SteeringPlan
from steerline.steering.gated import SteeringModule

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["How do vaccines work?", "Tell me a joke."]
DEACTIVATE = [f"{layer}:{e}" for layer in range(3) for e in range(6)]  # 6 of 8 experts per layer


@pytest.fixture()
def moe_dir(tokenizer, tmp_path) -> Path:
    """A tiny MoE whose untied random output layer gives varied (not blank) greedy tokens and
    whose experts are large enough for expert steering to change them."""
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(tiny_moe_config(len(tokenizer), tie_word_embeddings=False))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
            for param in layer.mlp.experts.parameters():
                param.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 1.0)
    save_model(finish_model(model, tokenizer), tokenizer, tmp_path / "moe")
    return tmp_path / "moe"


@pytest.fixture()
def dense_dir(tiny_dense, tokenizer, tmp_path) -> Path:
    save_model(tiny_dense, tokenizer, tmp_path / "dense")
    return tmp_path / "dense"


def answers(model_dir: Path, steering, n_new: int) -> list[str]:
    """The library's answers, decoded as the CLI does."""
    with make_backend("transformers", str(model_dir)) as b:
        out = b.generate([render_chat(b.tokenizer, p) for p in PROMPTS], n_new, steering)
        return [b.tokenizer.decode(o.token_ids.tolist(), skip_special_tokens=True).strip()
                for o in out]


# ------------------------------------------------------------------------------- help, parsing
def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for name in ("generate", "experts", "routes", "stages"):
        assert name in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: steerline {command}" in capsys.readouterr().out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "steerline.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("usage: steerline")


def test_parse_pairs():
    assert parse_pairs("3:5, 12:0", "--activate") == ((3, 5), (12, 0))
    with pytest.raises(CliError, match="LAYER:EXPERT pairs"):
        parse_pairs("3-5", "--activate")


def test_side_by_side_wraps_both_columns():
    text = side_by_side("a " * 30, "b", ("left", "right"), 43)
    lines = text.splitlines()
    assert lines[0] == "left                 | right"
    assert all(len(x) <= 43 for x in lines) and lines[2].endswith("| b")
    assert len(lines) == 2 + 3  # 60 chars in columns of 20


# ------------------------------------------------------------------------------------- generate
def test_generate_compare_matches_the_backend(moe_dir, capsys):
    code, out, err = run_cli(capsys, "generate", "--model", str(moe_dir), "--prompt", PROMPTS[0],
                             "--prompt", PROMPTS[1], "--deactivate", ",".join(DEACTIVATE),
                             "--delta", "0.01", "--compare", "--max-new-tokens", "6")
    assert code == 0, err
    plan = SteeringPlan(deactivate=tuple((i // 6, i % 6) for i in range(18)), delta=0.01)
    plain, steered = answers(moe_dir, None, 6), answers(moe_dir, Steering(experts=plan), 6)
    assert "activate 0, deactivate 18 (delta 0.01" in out
    assert out.count("unsteered") == 2 and "[2] Tell me a joke." in out
    block = out.split("[1] ")[1].split("[2] ")[0]
    left = " ".join(ln.split(" | ")[0].strip() for ln in block.splitlines()[3:])
    right = " ".join(ln.split(" | ")[1].strip() for ln in block.splitlines()[3:] if " | " in ln)
    assert left.split() == plain[0].split() and right.split() == steered[0].split()
    assert plain[0] and steered[0] != plain[0]  # routing forced to experts 6, 7 changes it


def test_generate_mat_steer_on_a_dense_model(dense_dir, tmp_path, capsys):
    module = SteeringModule(32, 2, init_scale=1.0, generator=torch.Generator().manual_seed(0))
    save_steering(module, SteeringConfig(["a", "b"], 1, 32, str(dense_dir)), tmp_path / "mat")
    code, out, err = run_cli(capsys, "generate", "--mat", str(tmp_path / "mat"), "--prompt",
                             PROMPTS[0], "--max-new-tokens", "5")
    assert code == 0, err
    assert f"MAT-Steer {tmp_path / 'mat'} at layer 1" in out
    expected = answers(dense_dir, Steering(activation=ActivationSteering(1, module=module)), 5)
    assert out.strip().splitlines()[-1] == expected[0]


def test_generate_experts_json_uses_the_params_defaults(moe_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "experts.json").write_text('{"unsafe": [[0, 1], [1, 2]], "safe": [[2, 0]]}')
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["expert_steering"].update(mode="deactivate_unsafe", n_experts=1, delta=0.5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "generate", "--model", str(moe_dir), "--prompt", PROMPTS[0],
                             "--experts", "experts.json", "--max-new-tokens", "3")
    assert code == 0, err
    assert "activate 0, deactivate 1 (delta 0.5; deactivate: experts.json)" in out


def test_the_commands_read_params_yaml_through_its_schema(moe_dir, tmp_path, capsys,
                                                          monkeypatch):
    """A params.yaml in the working folder is the pipeline's: checked whole, as the stages
    check it, so a partial or wrong one is one line naming the key (not a silent default)."""
    (tmp_path / "params.yaml").write_text(
        "expert_steering:\n  mode: deactivate_unsafe\n  n_experts: 1\n  delta: 0.5\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "routes", "--model", str(moe_dir), "--prompt", "Hi",
                           "--deactivate", "0:1")
    assert code == 2
    one_line(err, "params.yaml: params key 'seed' is missing: every key is required")


@pytest.mark.parametrize(("extra", "needle"), [
    (["--activate", "3-5"], "--activate takes LAYER:EXPERT pairs"),
    (["--activate", "7:0"], "expert [7, 0] names layer 7"),
    (["--compare"], "--compare needs something to compare"),
    (["--mode", "both"], "add --experts models/experts.json"),
    (["--experts", "nope.json"], "nope.json not found (the selected experts)"),
    (["--experts", "x.json", "--activate", "0:1"], "either --experts or --activate"),
    (["--backend", "onnx"], "--backend must be one of transformers, vllm"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_generate_errors_name_the_fix(moe_dir, capsys, extra, needle):
    code, _, err = run_cli(capsys, "generate", "--model", str(moe_dir), "--prompt", "Hi", *extra)
    assert code == 2
    one_line(err, needle)


def test_generate_expert_steering_on_a_dense_model_is_refused(dense_dir, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", str(dense_dir), "--prompt", "Hi",
                           "--deactivate", "0:1")
    assert code == 2
    one_line(err, "is a dense model: expert steering needs an MoE model")


def test_generate_missing_model(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "none"), "--prompt", "Hi")
    assert code == 2
    one_line(err, "run `dvc repro build_models` or pass --model DIR")


# -------------------------------------------------------------------------------------- experts
def risk_diff_frame() -> pd.DataFrame:
    rd = [0.3, -0.2, 0.1, -0.4, 0.0, 0.2]
    return pd.DataFrame({
        "layer": [0, 0, 1, 1, 2, 2], "expert": [0, 1, 0, 1, 0, 1], "risk_diff": rd,
        "ci_low": [r - 0.05 for r in rd], "ci_high": [r + 0.05 for r in rd],
        "q_perm": [0.001, 0.01, 0.2, 0.0001, 1.0, 0.04],
        "matched_risk_diff": [-0.1, 0.5, 0.2, 0.0, 0.3, -0.3],
    })


def test_experts_table(tmp_path, capsys):
    risk_diff_frame().to_parquet(tmp_path / "rd.parquet")
    code, out, err = run_cli(capsys, "experts", "--risk-diff", str(tmp_path / "rd.parquet"),
                             "--top", "2")
    assert code == 0, err
    rows = [ln.split() for ln in out.splitlines()[3:]]
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [
        ("unsafe", "0", "0", "0.300"), ("unsafe", "2", "1", "0.200"),
        ("safe", "1", "1", "-0.400"), ("safe", "0", "1", "-0.200")]
    assert rows[0][5:7] == ["[0.250,", "0.350]"] and rows[0][7] == "0.001"
    assert "q (q_perm)" in out.splitlines()[1]


def test_experts_other_contrast_and_markdown(tmp_path, capsys):
    risk_diff_frame().to_parquet(tmp_path / "rd.parquet")
    code, out, _ = run_cli(capsys, "experts", "--risk-diff", str(tmp_path / "rd.parquet"),
                           "--top", "1", "--contrast", "matched", "--markdown")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].startswith("| side | # | layer")
    assert lines[3] == "| unsafe | 1 | 0 | 1 | 0.500 | n/a | n/a |"
    assert lines[4] == "| safe | 1 | 2 | 1 | -0.300 | n/a | n/a |"


def test_experts_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "experts", "--risk-diff", str(tmp_path / "none.parquet"))
    assert code == 2
    one_line(err, "run the risk_diff stage")
    risk_diff_frame().to_parquet(tmp_path / "rd.parquet")
    code, _, err = run_cli(capsys, "experts", "--risk-diff", str(tmp_path / "rd.parquet"),
                           "--contrast", "style")
    one_line(err, "contrast 'style' is not in the risk_diff report; it has pooled, matched")


# --------------------------------------------------------------------------------------- routes
def test_routes_prints_the_captured_routing(moe_dir, capsys):
    code, out, err = run_cli(capsys, "routes", "--model", str(moe_dir), "--prompt", PROMPTS[0],
                             "--max-new-tokens", "4")
    assert code == 0, err
    with make_backend("transformers", str(moe_dir)) as b:
        r = b.generate_and_capture([render_chat(b.tokenizer, PROMPTS[0])], 4)[0]
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("top-1 expert")) + 2
    token_lines = lines[start:start + len(r.token_ids)]
    top1 = r.experts.reshape(len(r.token_ids), 3, 2)[:, :, 0]
    for line, row, gen in zip(token_lines, top1, r.is_generated, strict=True):
        assert line[14] == ("*" if gen else " ")
        assert [int(x) for x in line[15:].split()] == row.tolist()
    assert sum(ln.startswith("L  ") for ln in lines) == 3  # one heat-map row per layer


def test_routes_under_expert_steering(moe_dir, capsys):
    code, out, err = run_cli(capsys, "routes", "--model", str(moe_dir), "--prompt", PROMPTS[1],
                             "--max-new-tokens", "3", "--deactivate", ",".join(DEACTIVATE[:6]),
                             "--delta", "0.01")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith("steered")
    start = next(i for i, ln in enumerate(lines) if ln.startswith("top-1 expert")) + 2
    rows = [ln[15:].split() for ln in lines[start:lines.index("", start)]]
    assert rows and {int(r[0]) for r in rows} <= {6, 7}  # layer 0: experts 0..5 deactivated
    layer0 = next(ln for ln in lines if ln.startswith("L  0 |"))
    assert layer0[6:12] == "      "  # no token routed to experts 0..5 at layer 0


def test_heat_map_shades():
    experts = np.array([[0, 1], [0, 2], [0, 1], [0, 3]])  # 4 tokens, 1 layer, top-2 of 4
    lines = heat_map(experts, np.ones(4, bool), 2, 4)
    # shares 1, .5, .25, .25 of 9 shade steps -> 9, 4.5 -> 4, 2.25 -> 2, 2
    assert lines[2] == "L  0 |@=::|"


def test_routes_on_a_dense_model(dense_dir, capsys):
    code, _, err = run_cli(capsys, "routes", "--model", str(dense_dir), "--prompt", "Hi")
    assert code == 2
    one_line(err, "is a dense model: routes needs an MoE model")


# --------------------------------------------------------------------------------------- stages
def test_stages_of_the_project(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = run_cli(capsys, "stages")
    assert code == 0
    stages = read_stages(ROOT / "dvc.yaml")
    assert [ln for ln in out.splitlines() if not ln.startswith(" ")] == list(stages)
    assert "capture_routing@base" in edges(stages)["build_models"]
    assert "capture_routing@finetuned" in edges(stages)["finetune_experts"]
    # prepare_safety's source deps are ${prepare_safety.sources[i].path}: shown as the paths
    assert stages["prepare_safety"]["reads"] == [
        "data/raw/advbench/harmful_behaviors.csv", "data/raw/xstest/xstest_prompts.csv",
        "data/raw/alpaca/alpaca_instructions.jsonl", "data/raw/benign_imperative/prompts.csv"]


def test_stages_graph_from_outs_to_deps(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  a:\n    cmd: x\n    deps: [src/steerline/core/io.py, raw.csv]\n    outs: [data/a]\n"
        "  b:\n    cmd: y\n    deps: [data/a/part.parquet]\n    params: [seed]\n"
        "    metrics: [{m.json: {cache: false}}]\n")
    st = read_stages(tmp_path / "dvc.yaml")
    assert st["a"]["reads"] == ["raw.csv"] and st["a"]["modules"] == ["src/steerline/core/io.py"]
    assert st["b"]["writes"] == ["m.json"] and st["b"]["params"] == ["seed"]
    assert edges(st) == {"a": ["b"], "b": []}


def test_stages_missing_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "stages", "--dvc-yaml", str(tmp_path / "dvc.yaml"))
    assert code == 2
    one_line(err, "not found: run inside the project")


def test_generate_gate_steers_only_where_it_fires(moe_dir, tmp_path, capsys):
    """A gate that fires on the first prompt only: that answer is the steered one, the other
    the unsteered one."""
    from steerline.model.load import load_moe
    from steerline.steermoe.gating.features import prompt_features
    from steerline.steermoe.gating.prompt_gate import PromptGate

    model, tok = load_moe(moe_dir)
    x = prompt_features(model, tok, PROMPTS, [1], 2)["residual_1"].astype(np.float64)
    w = x[0] - x[1]  # scores: prompt 1 above the midpoint, prompt 2 below it
    PromptGate("residual", 1, w, float(-w @ (x[0] + x[1]) / 2), 0.5).save(tmp_path / "gate")
    code, out, err = run_cli(capsys, "generate", "--model", str(moe_dir), "--prompt", PROMPTS[0],
                             "--prompt", PROMPTS[1], "--deactivate", ",".join(DEACTIVATE),
                             "--delta", "0.01", "--gate", str(tmp_path / "gate"),
                             "--max-new-tokens", "6")
    assert code == 0, err
    plan = SteeringPlan(deactivate=tuple((i // 6, i % 6) for i in range(18)), delta=0.01)
    plain, steered = answers(moe_dir, None, 6), answers(moe_dir, Steering(experts=plan), 6)
    first, second = out.split("[1] ")[1].split("[2] ")
    assert "steered)" in first and "not steered)" in second
    assert first.splitlines()[1].split() == steered[0].split()
    assert second.splitlines()[1].split() == plain[1].split()
