"""params.yaml is the only source of values: strict types, bounds, required keys, clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from stage_cmd import stage_argv

from steerline.core.params import ParamsError, cli_defaults, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def _with(section: str, key: str, value: object) -> dict:
    raw = copy.deepcopy(RAW)
    raw[section][key] = value
    return raw


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("select_experts", "top_k", True, "select_experts.top_k': Input should be a valid integer"),
        ("select_experts", "threshold", "0.1", "threshold': Input should be a valid number"),
        ("select_experts", "threshold", 2.0, "select_experts.threshold': Input should be less"),
        ("select_experts", "threshold", float("nan"), "threshold': Input should be a finite"),
        ("train_steering", "lr", float("inf"), "train_steering.lr': Input should be a finite"),
        ("capture_routing", "max_new_tokens", -1, "capture_routing.max_new_tokens"),
        ("prepare_safety", "detect_fraction", 1.0, "prepare_safety.detect_fraction"),
    ],
)
def test_loose_or_out_of_range_values_are_rejected(section, key, value, match):
    with pytest.raises(ParamsError, match=match):
        parse_params(_with(section, key, value))


def test_a_missing_section_or_key_is_an_error_not_a_default():
    raw = copy.deepcopy(RAW)
    del raw["risk_diff"]
    with pytest.raises(ParamsError, match="'risk_diff' is missing: every key is required"):
        parse_params(raw)
    raw = copy.deepcopy(RAW)
    del raw["select_experts"]["alpha"]
    with pytest.raises(ParamsError, match="'select_experts.alpha' is missing"):
        parse_params(raw)


def test_no_schema_defaults_so_params_yaml_is_the_only_source_of_values():
    from pydantic import BaseModel

    from steerline.core import params

    for cls in vars(params).values():
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            defaults = [n for n, f in cls.model_fields.items() if not f.is_required()]
            assert not defaults, f"{cls.__name__} has schema defaults for {defaults}"


def test_the_commands_defaults_outside_the_project_are_the_committed_values():
    """`steerline detect` / `generate` without a params.yaml take the schema's CliDefault
    values: each is the committed params.yaml's value, of the same type."""
    def committed(raw: dict, shape: dict) -> dict:
        return {k: committed(raw[k], v) if isinstance(v, dict) else raw[k]
                for k, v in shape.items()}

    defaults = cli_defaults()
    assert defaults["seed"] == 0 and defaults["risk_diff"]["n_permutations"] >= 1
    assert set(defaults["capture_routing"]) == {"max_new_tokens", "batch_size", "shard_prompts",
                                                "dtype"}
    assert committed(RAW, defaults) == defaults
    assert repr(committed(RAW, defaults)) == repr(defaults)  # 1000 is not 1000.0


@pytest.mark.parametrize("text, match", [
    ("", "params.yaml is empty or not a YAML mapping"),
    ("- a\n- b\n", "not a YAML mapping"),
    ("seed: 0\nrisk_diff: [1, 2\nx: 3\n", r"params.yaml:3:\d+: invalid YAML"),
])
def test_empty_or_invalid_yaml_is_one_line_with_file_and_line(tmp_path, text, match):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=match) as err:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(err.value)


def test_stage_without_params_fails_before_writing(tmp_path):
    """A direct `python stages/x.py` with an empty params.yaml stops with the params error."""
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("seed: 0\n")
    proc = subprocess.run([sys.executable, *stage_argv("select_experts@base")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "is missing: every key is required" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
