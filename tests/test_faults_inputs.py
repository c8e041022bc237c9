"""Fault injection on what a user points the pipeline at: pickle weight files in a model folder
(refused, even beside a safetensors file), params.yaml whose values are huge (an alias bomb, a
2 MB string: refused or quoted as a bounded excerpt, on one line) and data paths outside the
repository (refused naming the key, unless under STEERLINE_DATA_ROOTS; model paths are free)."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from stage_cmd import call_stage
from test_params_safety import ADV, XS, entry, stage_dir

from steerline.cli.common import params_section
from steerline.core.errors import run_stage
from steerline.core.params import ParamsError, load_params, parse_params
from steerline.model.gguf import save_model
from steerline.model.load import check_weights, load_causal_lm
from steerline.steermoe.safety.refusal import make_judge

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())
# the line a stage prints must be short whatever the params hold
SHORT = 500


def stage_line(fn) -> str:
    """The one line a stage prints for the user error `fn` raises (steerline.core.errors)."""
    with pytest.raises(SystemExit) as exit_:
        run_stage(fn, "stage")
    line = str(exit_.value.code)
    assert "\n" not in line and "Traceback" not in line, line[:SHORT]
    return line


# ---------------------------------------------------------------- pickle weights


@pytest.fixture()
def model_dir(tiny_dense, tokenizer, tmp_path) -> Path:
    save_model(tiny_dense, tokenizer, tmp_path / "model")
    return tmp_path / "model"


def pickle_beside_small_safetensors(folder: Path) -> None:
    """The back door: pytorch_model.bin holds the weights, a small *.safetensors file is
    there too (model.safetensors is not, so transformers would torch.load the .bin)."""
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    save_file({"x": torch.zeros(1)}, folder / "extra.safetensors")


def test_pickle_beside_a_safetensors_file_is_refused_naming_it(model_dir, monkeypatch):
    pickle_beside_small_safetensors(model_dir)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ValueError, match="pytorch_model.bin is part of a pickle checkpoint"):
        load_causal_lm(model_dir)
    with pytest.raises(ValueError, match="pytorch_model.bin is part of a pickle checkpoint"):
        make_judge("llm", str(model_dir))  # eval_safety.judge_model
    line = stage_line(lambda: check_weights(model_dir))  # vLLM's check, too
    assert str(model_dir / "pytorch_model.bin") in line, line
    assert "convert the checkpoint to safetensors" in line, line
    assert "remove pytorch_model.bin" in line, line


def test_a_bin_only_folder_is_refused_naming_the_file(model_dir):
    torch.save({"w": torch.zeros(1)}, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="pytorch_model.bin is part of a pickle checkpoint"):
        check_weights(model_dir)


@pytest.mark.parametrize("name", ["pytorch_model-00001-of-00002.bin",
                                  "pytorch_model.bin.index.json", "model.pt", "weights.pth",
                                  "model.ckpt", "state.pkl", "state.pickle", "training_args.bin"])
def test_any_pickle_file_beside_model_safetensors_is_refused(model_dir, name):
    (model_dir / name).write_bytes(b"not read")
    with pytest.raises(ValueError, match=f"{name} is part of a pickle checkpoint"):
        check_weights(model_dir)


def test_a_safetensors_folder_loads_with_use_safetensors(model_dir, tiny_dense, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model, _ = load_causal_lm(model_dir, device="cpu")
    assert seen["use_safetensors"] is True
    for (name, a), b in zip(model.state_dict().items(), tiny_dense.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["moe", "base", "moe_finetuned"])
def test_the_projects_own_models_pass_the_weights_check(name):
    folder = ROOT / "models" / name
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"{folder} not built (dvc repro build_models / finetune_experts)")
    check_weights(folder)


# ---------------------------------------------------------------- huge params values


def alias_bomb(levels: int) -> str:
    """A "billion laughs": each level an anchored list of 9 aliases of the one before, as the
    value of `seed` (9**(levels + 1) scalars once expanded, a few hundred bytes of YAML)."""
    items = ['&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


def params_file(tmp_path: Path, seed: str) -> Path:
    text = (ROOT / "params.yaml").read_text()
    assert text.count("\nseed: 0\n") == 1
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("\nseed: 0\n", f"\nseed: {seed}\n"))
    return path


@pytest.mark.parametrize("levels", [6, 9])
def test_an_alias_bomb_is_refused_quickly_on_one_short_line(tmp_path, levels):
    path = params_file(tmp_path, alias_bomb(levels))
    assert path.stat().st_size < (ROOT / "params.yaml").stat().st_size + 1500
    start = time.perf_counter()
    line = stage_line(lambda: load_params(path))
    assert time.perf_counter() - start < 2.0
    assert len(line) < SHORT, line[:SHORT]
    assert f"{path}: its YAML aliases expand to over 100,000 values" in line, line
    with pytest.raises(ValueError, match="aliases expand to over"):
        params_section("seed", path)  # the CLI's look-ups read params.yaml the same way


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    line = stage_line(lambda: load_params(params_file(tmp_path, "&loop [1, *loop]")))
    assert "aliases expand to over" in line and len(line) < SHORT, line[:SHORT]


def test_a_few_aliases_load_as_before(tmp_path):
    path = params_file(tmp_path, "&zero 0")
    text = path.read_text()
    assert text.count("\ndata_seed: 0\n") == 1
    path.write_text(text.replace("\ndata_seed: 0\n", "\ndata_seed: *zero\n"))
    assert load_params(path) == load_params(ROOT / "params.yaml")


def test_a_2mb_string_is_quoted_as_a_bounded_excerpt(tmp_path):
    path = params_file(tmp_path, '"' + "x" * 2_000_000 + '"')
    line = stage_line(lambda: load_params(path))
    assert len(line) < SHORT and "params key 'seed'" in line, line[:SHORT]
    assert "'xxxx" in line and "... (2000002 chars)" in line, line[:SHORT]


@pytest.mark.parametrize("edit", ["key", "list"])
def test_a_huge_key_or_many_bad_items_give_a_bounded_line(edit):
    raw = copy.deepcopy(RAW)
    if edit == "key":
        raw["risk_diff"]["k" * 2_000_000] = 1
    else:
        raw["train_steering"]["bandwidths"] = ["x"] * 100_000
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    message = str(err.value)
    assert len(message) < 20 * SHORT, message[:SHORT]
    assert ("... (2000012 chars)" if edit == "key" else "and 99950 more errors") in message


# ---------------------------------------------------------------- data paths


def source(path: str) -> dict:
    return entry(name="own", path=path, format="txt", prompt_id="own-{index:02d}",
                 label="unsafe")


def with_sources(*sources: dict) -> dict:
    raw = copy.deepcopy(RAW)
    raw["prepare_safety"]["sources"] = [ADV, XS, *sources]
    return raw


def test_a_source_at_etc_passwd_is_refused_naming_the_key(tmp_path, monkeypatch):
    stage_dir(tmp_path, monkeypatch, [ADV, XS, source("/etc/passwd")])
    line = stage_line(lambda: call_stage("prepare_safety"))
    assert "params key 'prepare_safety.sources.2.path' (source 'own')" in line, line[:SHORT]
    assert "outside the repository root" in line and "'/etc/passwd'" in line, line[:SHORT]
    assert "STEERLINE_DATA_ROOTS" in line and len(line) < SHORT, line[:SHORT]
    assert not (tmp_path / "data/prompts").exists()


@pytest.mark.parametrize("path", ["../outside.txt", "data/../../outside.txt"])
def test_a_dotdot_path_out_of_the_repository_is_refused(tmp_path, monkeypatch, path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "outside.txt").write_text("a prompt\n")
    monkeypatch.chdir(tmp_path / "repo")
    with pytest.raises(ParamsError, match=r"prepare_safety.sources.2.path' \(source 'own'\): "
                                          "the file is outside the repository root"):
        parse_params(with_sources(source(path)))


def test_a_user_attribute_outside_the_repository_is_refused(monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = copy.deepcopy(RAW)
    raw["attributes"] = ["truthfulqa", {"name": "mine", "path": "/etc/passwd",
                                        "test_fraction": 0.3}]
    with pytest.raises(ParamsError, match="'attributes.1.file.path': the file is outside the "
                                          "repository root"):
        parse_params(raw)


def test_paths_inside_the_repository_are_accepted(monkeypatch):
    monkeypatch.chdir(ROOT)
    inside = ["data/examples/pirate/pirate.txt", "./data/x/../examples/pirate/pirate.txt",
              str(ROOT / "data/examples/pirate/pirate.txt")]
    p = parse_params(with_sources(*(source(s) for s in inside)))
    assert [s.path for s in p.prepare_safety.sources[2:]] == inside
    assert load_params(ROOT / "params.yaml") == parse_params(RAW)


def test_model_paths_are_not_restricted(monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = copy.deepcopy(RAW)
    raw.update(model="/data/ckpt/Qwen3-30B", dense_model="../llama")
    raw["eval_safety"]["judge_model"] = "../judges/llama"
    p = parse_params(raw)
    assert (p.model, p.dense_model) == ("/data/ckpt/Qwen3-30B", "../llama")


def test_steerline_data_roots_lets_a_stage_read_data_kept_elsewhere(tmp_path, monkeypatch):
    outside = tmp_path / "shared" / "prompts"
    outside.mkdir(parents=True)
    (outside / "mine.txt").write_text("".join(f"My own prompt number {i}\n" for i in range(10)))
    repo = tmp_path / "repo"
    monkeypatch.setenv("STEERLINE_DATA_ROOTS", os.pathsep.join(["/nonexistent", str(outside)]))
    stage_dir(repo, monkeypatch, [ADV, XS, source(str(outside / "mine.txt"))])
    call_stage("prepare_safety")
    df = pd.read_parquet(repo / "data/prompts/safety.parquet")
    assert (df["source"] == "own").sum() == 10
    monkeypatch.setenv("STEERLINE_DATA_ROOTS", str(tmp_path / "shared" / "other"))
    with pytest.raises(ParamsError, match="outside the repository root"):
        load_params()
