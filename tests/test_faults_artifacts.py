"""Fault injection on the trained artifacts a command or stage reads: a prompt gate or a MAT-Steer
checkpoint cut short or with a broken JSON, and an experts.json that lists an expert as both
unsafe and safe. Each is one line naming the file (the CLI: exit status 2, before any model
weight is read; a stage: run_stage's one line), never a traceback or a silent default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_run import one_line, run_cli
from conftest import tiny_moe_config

from steerline.cli import main
from steerline.core.errors import run_stage
from steerline.core.params import load_params
from steerline.mat_steer.checkpoint import SteeringConfig, load_steering, save_steering
from steerline.steering.experts import plan_from_experts
from steerline.steering.gated import SteeringModule
from steerline.steermoe.gating.prompt_gate import PromptGate, load_gate

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 32  # tiny_moe_config's hidden size


class ModelLoaded(AssertionError):
    pass


@pytest.fixture()
def no_model(monkeypatch):
    """Any read of the model's weights fails the command with ModelLoaded (the artifacts must
    be checked first); tokenizer and context checks come after check_weights."""
    def refuse(*_a, **_k):
        raise ModelLoaded("the model was loaded before the artifacts were checked")
    for target in ("steerline.model.load.check_weights", "steerline.model.load.load_moe",
                   "steerline.backends.make_backend"):
        monkeypatch.setattr(target, refuse)


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    """A tiny MoE's config.json alone: what the CLI reads before the weights."""
    tiny_moe_config(100).save_pretrained(tmp_path / "moe")
    return tmp_path / "moe"


@pytest.fixture()
def gate_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    PromptGate("residual", 1, rng.normal(size=HIDDEN), 0.1, 0.4, {"C": 1.0}).save(
        tmp_path / "gate")
    return tmp_path / "gate"


@pytest.fixture()
def mat_dir(tmp_path) -> Path:
    config = SteeringConfig(["truthfulqa", "toxigen"], 1, HIDDEN, "models/base", {"seed": 0})
    save_steering(SteeringModule(HIDDEN, 2, generator=torch.Generator().manual_seed(0)), config,
                  tmp_path / "mat")
    return tmp_path / "mat"


def cut_in_half(file: Path) -> Path:
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    return file


def edit_json(file: Path, edit) -> Path:
    file.write_text(json.dumps(edit(json.loads(file.read_text()))))
    return file


def without(key: str):
    return lambda obj: {k: v for k, v in obj.items() if k != key}


# (damage to the folder, the file the message names, what it says)
GATE_FAULTS = {
    "safetensors cut in half": (lambda g: cut_in_half(g / "residual.safetensors"),
                                "residual.safetensors",
                                "is truncated or corrupt (Error while deserializing header"),
    "json without threshold": (lambda g: edit_json(g / "residual.json", without("threshold")),
                               "residual.json", "lacks threshold: rerun the train_gate stage"),
    "json a list": (lambda g: edit_json(g / "residual.json", lambda obj: list(obj.values())),
                    "residual.json", "is a JSON list, not an object"),
    "threshold NaN": (lambda g: edit_json(g / "residual.json",
                                          lambda obj: {**obj, "threshold": float("nan")}),
                      "residual.json", "has threshold nan, not a number in [0, 1]"),
    "threshold inf": (lambda g: edit_json(g / "residual.json",
                                          lambda obj: {**obj, "threshold": float("inf")}),
                      "residual.json", "has threshold inf, not a number in [0, 1]"),
    "layer a string": (lambda g: edit_json(g / "residual.json",
                                           lambda obj: {**obj, "layer": "1"}),
                       "residual.json", "has layer '1', not a hidden_states index"),
    "n_features off": (lambda g: edit_json(g / "residual.json",
                                           lambda obj: {**obj, "n_features": HIDDEN + 1}),
                       "residual.safetensors", "residual.json expects weight (33,)"),
}

MAT_FAULTS = {
    "checkpoint cut in half": (lambda m: cut_in_half(m / "steering.safetensors"),
                               "steering.safetensors",
                               "is truncated or corrupt (Error while deserializing header"),
    "config without layer": (lambda m: edit_json(m / "config.json", without("layer")),
                             "config.json", "lacks layer: rerun the train_steering stage"),
    "config a list": (lambda m: edit_json(m / "config.json", lambda obj: list(obj)),
                      "config.json", "is a JSON list, not an object"),
    "config not JSON": (lambda m: (m / "config.json").write_text("{\"layer\": "),
                        "config.json", "is not valid JSON"),
    "hidden size off": (lambda m: edit_json(m / "config.json",
                                            lambda obj: {**obj, "hidden_size": HIDDEN * 2}),
                        "", "tensor shapes"),  # names the checkpoint folder
}


# ------------------------------------------------------------------------------ prompt gates
def test_a_valid_gate_loads_as_saved(gate_dir):
    gate = load_gate(gate_dir, "residual")
    assert gate.layer == 1 and gate.threshold == 0.4 and gate.bias == 0.1
    assert gate.info == {"C": 1.0} and gate.weight.shape == (HIDDEN,)


@pytest.mark.parametrize("fault", GATE_FAULTS)
def test_a_corrupt_gate_is_one_value_error(gate_dir, fault):
    damage, name, needle = GATE_FAULTS[fault]
    damage(gate_dir)
    with pytest.raises(ValueError) as exc:
        load_gate(gate_dir, "residual")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{gate_dir / name} ") and needle in msg, msg
    assert "train_gate" in msg


def test_a_routing_gate_file_given_a_layer_is_refused(tmp_path):
    PromptGate("routing", None, np.ones(4), 0.0, 0.5).save(tmp_path)
    assert load_gate(tmp_path, "routing").layer is None
    edit_json(tmp_path / "routing.json", lambda obj: {**obj, "layer": 3})
    with pytest.raises(ValueError, match="has layer 3: a routing gate reads no layer"):
        load_gate(tmp_path, "routing")


def test_nan_gate_weights_are_refused(gate_dir):
    from safetensors.numpy import save_file

    save_file({"weight": np.full(HIDDEN, np.nan), "bias": np.zeros(1)},
              str(gate_dir / "residual.safetensors"))
    with pytest.raises(ValueError, match="residual.safetensors holds NaN or infinite weights"):
        load_gate(gate_dir, "residual")


@pytest.mark.parametrize("fault", GATE_FAULTS)
def test_cli_generate_reports_a_corrupt_gate_before_the_model(model_dir, gate_dir, capsys,
                                                              no_model, fault):
    damage, name, needle = GATE_FAULTS[fault]
    damage(gate_dir)
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), "--prompt", "Hi",
                           "--activate", "0:1", "--delta", "0.5", "--gate", str(gate_dir))
    assert code == 2
    assert one_line(err, needle).startswith(f"steerline generate: error: {gate_dir / name} ")


def test_cli_generate_with_a_valid_gate_goes_on_to_the_model(model_dir, gate_dir, no_model):
    with pytest.raises(ModelLoaded):  # the fixture's own check: the next step is the model
        main(["generate", "--model", str(model_dir), "--prompt", "Hi", "--activate", "0:1",
              "--delta", "0.5", "--gate", str(gate_dir)])


def test_answer_safety_reports_a_corrupt_gate_in_one_line(gate_dir, monkeypatch):
    from steerline.pipeline import answer_safety

    monkeypatch.setattr(answer_safety, "load_moe", lambda *_a: pytest.fail("model loaded"))
    weights = cut_in_half(gate_dir / "residual.safetensors")
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(SystemExit) as exc:
        run_stage(lambda: answer_safety.answer_model(
            params, "models/moe", pd.DataFrame({"text": ["Hi"]}), lambda _shape: {},
            {"steered": "residual"}, gate_dir, None, {}), "answer_safety_base")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"answer_safety_base: {weights} is truncated")


# ------------------------------------------------------------------- MAT-Steer checkpoints
def test_a_valid_checkpoint_loads_as_saved(mat_dir):
    module, config = load_steering(mat_dir)
    assert config == SteeringConfig(["truthfulqa", "toxigen"], 1, HIDDEN, "models/base",
                                    {"seed": 0})
    assert module.steering_vectors.shape == (2, HIDDEN)


@pytest.mark.parametrize("fault", MAT_FAULTS)
def test_a_corrupt_checkpoint_is_one_value_error(mat_dir, fault):
    damage, name, needle = MAT_FAULTS[fault]
    damage(mat_dir)
    with pytest.raises(ValueError) as exc:
        load_steering(mat_dir)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(mat_dir / name)) and needle in msg, msg
    assert "train_steering" in msg


@pytest.mark.parametrize("fault", MAT_FAULTS)
def test_cli_generate_reports_a_corrupt_checkpoint_before_the_model(model_dir, mat_dir, capsys,
                                                                    no_model, fault):
    damage, name, needle = MAT_FAULTS[fault]
    damage(mat_dir)
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), "--prompt", "Hi",
                           "--mat", str(mat_dir))
    assert code == 2
    assert one_line(err, needle).startswith(f"steerline generate: error: {mat_dir / name}")


def test_cli_generate_with_a_valid_checkpoint_goes_on_to_the_model(model_dir, mat_dir,
                                                                   no_model):
    with pytest.raises(ModelLoaded):
        main(["generate", "--model", str(model_dir), "--prompt", "Hi", "--mat", str(mat_dir)])


def test_eval_steering_reports_a_truncated_checkpoint_in_one_line(mat_dir, tmp_path):
    from steerline.pipeline import eval_steering

    weights = cut_in_half(mat_dir / "steering.safetensors")
    inputs = eval_steering.Inputs(tmp_path / "attributes", tmp_path / "activations", mat_dir,
                                  tmp_path / "baselines")
    with pytest.raises(SystemExit) as exc:
        run_stage(lambda: eval_steering.run(load_params(ROOT / "params.yaml"), inputs),
                  "eval_steering")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"eval_steering: {weights} is truncated")


# ------------------------------------------------------- experts.json: unsafe and safe at once
CONFLICT = {"unsafe": [[2, 7], [1, 3], [2, 6]], "safe": [[0, 0], [1, 3], [0, 1]]}


def test_an_expert_both_unsafe_and_safe_is_refused_under_both():
    with pytest.raises(ValueError, match=r"experts.json: expert \[1, 3\] \(layer, expert\) is "
                                         r"listed both as unsafe and as safe, so mode 'both'"):
        plan_from_experts(CONFLICT, "both", 3, 0.5, 3, 8, 2)
    # the modes that read one list steer it as before
    assert plan_from_experts(CONFLICT, "deactivate_unsafe", 3, 0.5, 3, 8, 2).deactivate == (
        (2, 7), (1, 3), (2, 6))
    assert plan_from_experts(CONFLICT, "activate_safe", 3, 0.5, 3, 8, 2).activate == (
        (0, 0), (1, 3), (0, 1))
    # listed on both sides but past the first n unsafe: it is only activated, no conflict
    plan = plan_from_experts(CONFLICT, "both", 1, 0.5, 3, 8, 2)
    assert plan.deactivate == ((2, 7),) and plan.activate == ((0, 0),)


def test_cli_generate_refuses_a_conflicting_experts_json_under_both(model_dir, tmp_path,
                                                                    capsys, no_model):
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps(CONFLICT))
    args = ("generate", "--model", str(model_dir), "--prompt", "Hi", "--experts", str(experts),
            "--n-experts", "3", "--delta", "0.5", "--on-empty-selection", "error")
    code, _, err = run_cli(capsys, *args, "--mode", "both")
    assert code == 2
    one_line(err, "experts.json: expert [1, 3] (layer, expert) is listed both as unsafe and as "
                  "safe")
    with pytest.raises(ModelLoaded):  # deactivate_unsafe reads one list: nothing to refuse
        main([*args, "--mode", "deactivate_unsafe"])
