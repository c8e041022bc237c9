"""Fault injection for issue 25: the context rule of every backend and command, corrupt weights
and missing tokenizers, the CLI's on_empty_selection, all-or-none publication of a stage's
outputs on a full disk, p-values in the metrics, top-k validation, a non-UTF-8 experts file,
`steerline stages` from a subfolder and vLLM's default log level."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from cli_run import one_line, run_cli

from steerline.backends.hf import TransformersBackend
from steerline.core.errors import UserError, run_stage
from steerline.core.io import staged_outputs, write_json
from steerline.core.params import load_params
from steerline.model.load import check_weights, load_causal_lm, load_tokenizer, moe_config
from steerline.steering.experts import read_experts_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_backend(monkeypatch):
    """make_backend fails the test if a command reaches it (the check must come first)."""
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr("steerline.backends.make_backend", refuse)


# ------------------------------------------------------------------- 3: one context rule
def test_transformers_backend_refuses_a_prompt_past_the_positions(tiny_moe, tokenizer,
                                                                   monkeypatch):
    backend = TransformersBackend(tiny_moe, tokenizer)
    assert backend.max_context == 512

    def no_work(*_a, **_k):
        raise AssertionError("generation started")
    monkeypatch.setattr("steerline.backends.hf.generate_routed_all", no_work)
    monkeypatch.setattr("steerline.backends.hf.greedy_generate_all", no_work)
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        backend.generate([[1] * 500], 13)
    with pytest.raises(ValueError, match="500 tokens; with max_new_tokens=13"):
        backend.generate_and_capture([[1] * 500], 13)


def test_dense_transformers_backend_refuses_too(tiny_dense, tokenizer, monkeypatch):
    backend = TransformersBackend(tiny_dense, tokenizer)
    monkeypatch.setattr("steerline.backends.hf.greedy_generate_all",
                        lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        backend.generate([[1] * 512], 1)


def test_vllm_backend_applies_the_same_rule():
    from steerline.backends.vllm_backend import VLLMBackend

    backend = object.__new__(VLLMBackend)  # no engine: the rule runs before any engine call
    backend.max_context, backend.native, backend.n_layers, backend.llm = 64, False, 3, None
    for call in (backend.generate, backend.generate_and_capture):
        with pytest.raises(ValueError, match="prompt '0' has 60 tokens; with max_new_tokens=8 "
                                             "it exceeds the model's context of 64"):
            call([[1] * 60], 8)


def test_cli_generate_checks_the_context_before_loading(moe_dir, capsys, no_backend):
    long = "word " * 80  # > 64 positions of the tiny model
    code, _, err = run_cli(capsys, "generate", "--model", str(moe_dir), "--prompt", long)
    assert code == 2
    one_line(err, "prompt '--prompt 1' has")
    code, _, err = run_cli(capsys, "routes", "--model", str(moe_dir), "--prompt", long)
    assert code == 2
    one_line(err, "exceeds the model's context of 64")


# ------------------------------------------------------------------ 4, 5: weights, tokenizer
def truncate(moe_dir: Path) -> Path:
    weights = moe_dir / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return weights


def test_truncated_weights_are_one_line_everywhere(moe_dir, capsys, monkeypatch, tmp_path):
    weights = truncate(moe_dir)
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or corrupt \(its "
                                         r"tensors need \d+ bytes"):
        load_causal_lm(moe_dir)
    for cmd in ("generate", "routes"):
        code, _, err = run_cli(capsys, cmd, "--model", str(moe_dir), "--prompt", "Hi")
        assert code == 2
        one_line(err, f"{weights} is truncated or corrupt")
    from steerline.backends.vllm_backend import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # the check must come before vLLM's import
    with pytest.raises(ValueError, match="is truncated or corrupt"):
        VLLMBackend(str(moe_dir))
    # capture_routing, before the fingerprint and the backend
    from steerline.pipeline import capture_routing

    prompts = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt_id": ["a"], "text": ["Hi"], "label": ["safe"], "split": ["detect"],
                  "source": ["xstest"]}).to_parquet(prompts)
    monkeypatch.setattr("steerline.steermoe.routing.capture_model.model_fingerprint",
                        lambda *_: pytest.fail("weights were read"))
    with pytest.raises(SystemExit) as exc:
        run_stage(lambda: capture_routing.main(
            load_params(ROOT / "params.yaml"),
            capture_routing.Inputs(model=str(moe_dir), prompts=prompts),
            capture_routing.Outputs(tmp_path / "r", tmp_path / "g.parquet", tmp_path / "c")),
            "capture_routing")
    assert str(exc.value).startswith(f"capture_routing: {weights} is truncated or corrupt")


@pytest.mark.parametrize("damage", ["header", "empty", "missing"])
def test_check_weights_names_the_file(moe_dir, damage):
    weights = moe_dir / "model.safetensors"
    if damage == "header":
        weights.write_bytes((10**9).to_bytes(8, "little") + b"{}")
        with pytest.raises(ValueError, match="header of 1000000000 bytes"):
            check_weights(moe_dir)
    elif damage == "empty":
        weights.write_bytes(b"")
        with pytest.raises(ValueError, match="0 bytes, shorter than the 8-byte header"):
            check_weights(moe_dir)
    else:
        weights.unlink()
        with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
            check_weights(moe_dir)


def test_missing_or_empty_tokenizer_is_one_line(moe_dir, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (moe_dir / name).unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_tokenizer(moe_dir)
    code, _, err = run_cli(capsys, "generate", "--model", str(moe_dir), "--prompt", "Hi")
    assert code == 2
    one_line(err, f"{moe_dir} has no tokenizer")
    (moe_dir / "tokenizer.json").write_text("")
    with pytest.raises(ValueError, match="tokenizer.json is empty: copy the tokenizer files"):
        load_tokenizer(moe_dir)
    (moe_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="does not load"):
        load_tokenizer(moe_dir)


# --------------------------------------------------------------- 6: CLI on_empty_selection
def test_cli_generate_honours_on_empty_selection(moe_dir, tmp_path, capsys, monkeypatch,
                                                 caplog):
    (tmp_path / "experts.json").write_text('{"unsafe": [], "safe": [[2, 0]]}')
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())  # the CLI checks the whole file
    raw["expert_steering"].update(mode="deactivate_unsafe", n_experts=3, delta=0.5,
                                  on_empty_selection="error")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    args = ("generate", "--model", str(moe_dir), "--prompt", "Hi", "--experts", "experts.json",
            "--max-new-tokens", "2")
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    one_line(err, "experts.json lists no unsafe experts (select_experts kept none)")
    # risk_diff_ranking without the ranking: the missing file is named
    code, _, err = run_cli(capsys, *args, "--on-empty-selection", "risk_diff_ranking")
    assert code == 2
    one_line(err, "reports/risk_diff.parquet not found")
    (tmp_path / "reports").mkdir()
    pd.DataFrame({"layer": [0, 0, 1, 1, 2], "expert": [0, 1, 0, 1, 0],
                  "risk_diff": [0.5, 0.4, 0.3, 0.2, 0.1]}).to_parquet(
        tmp_path / "reports/risk_diff.parquet")
    caplog.set_level(logging.WARNING)
    code, out, err = run_cli(capsys, *args, "--on-empty-selection", "risk_diff_ranking")
    assert code == 0, err
    assert "deactivate 3 (delta 0.5; deactivate: risk_diff_fallback)" in out
    # the warning counts the experts steered (3), not the ranking's length (5)
    assert "deactivating 3 experts from the top of the risk_diff ranking" in caplog.text


# ---------------------------------------------------------- 7: all outputs or none, ENOSPC
def full_disk(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def old_outputs(paths) -> dict[Path, bytes]:
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"old {i}".encode())
    return {p: p.read_bytes() for p in paths}


def assert_untouched(before: dict[Path, bytes]) -> None:
    for path, data in before.items():
        assert path.read_bytes() == data, path
    folders = {p.parent for p in before}
    left = [f for d in folders for f in d.iterdir() if f.name.endswith(".tmp")]
    assert not left, left


def test_risk_diff_full_disk_leaves_every_old_output(tmp_path, monkeypatch):
    from steerline.pipeline import risk_diff

    out = risk_diff.Outputs(tmp_path / "r/rd.parquet", tmp_path / "r/heat.png",
                            tmp_path / "r/top.csv", tmp_path / "r/summary.json")
    prompts = tmp_path / "safety.parquet"
    pd.DataFrame({"prompt_id": ["a"], "label": ["safe"], "source": ["x"]}).to_parquet(prompts)
    frame = pd.DataFrame({"layer": [0], "expert": [0], "risk_diff": [0.1]})
    monkeypatch.setattr(risk_diff, "compute_risk_diff", lambda *a, **k: (frame, {"m": "1"}))
    monkeypatch.setattr(risk_diff, "risk_diff_summary", lambda *a: {"x": 1})
    monkeypatch.setattr(risk_diff, "heatmap_png", lambda *a: b"PNG")
    monkeypatch.setattr(risk_diff, "plot_rows", lambda df: df)
    before = old_outputs([out.report, out.heatmap, out.plot_data, out.summary])
    # the disk fills up at the last output: the first three are already written (temporaries)
    monkeypatch.setattr(risk_diff, "write_json", full_disk)
    with pytest.raises(SystemExit) as exc:
        run_stage(lambda: risk_diff.main(load_params(ROOT / "params.yaml"),
                                         risk_diff.Inputs(tmp_path / "routing", prompts), out),
                  "risk_diff")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"risk_diff: cannot write {out.summary}: No space "
                                              "left on device: free space on that disk")
    assert_untouched(before)


def test_select_experts_full_disk_leaves_both_old_files(tmp_path, monkeypatch):
    from steerline.pipeline import select_experts

    report = tmp_path / "rd.parquet"
    pd.DataFrame({"layer": [0], "expert": [0]}).to_parquet(report)
    out = select_experts.Outputs(tmp_path / "m/experts.json", tmp_path / "r/summary.json")
    monkeypatch.setattr(select_experts, "select_experts", lambda *a, **k: {"unsafe": []})
    monkeypatch.setattr(select_experts, "experts_summary", lambda *a: {"n_unsafe": 0,
                                                                       "n_safe": 0})
    before = old_outputs([out.experts, out.summary])
    real = write_json

    def second_fails(obj, path):  # path: the summary's temporary
        if Path(path).name.startswith(".summary.json."):
            full_disk()
        real(obj, path)
    monkeypatch.setattr(select_experts, "write_json", second_fails)
    with pytest.raises(UserError, match=f"cannot write {out.summary}: No space left"):
        select_experts.main(load_params(ROOT / "params.yaml"), select_experts.Inputs(report),
                            out)
    assert_untouched(before)


def test_eval_steering_and_eval_safety_publish_all_or_none(tmp_path, monkeypatch):
    from steerline.pipeline import eval_safety, eval_steering

    monkeypatch.chdir(tmp_path)  # reports/timings
    out = eval_steering.Outputs(tmp_path / "r/m.json", tmp_path / "r/d.json",
                                tmp_path / "r/items.parquet", tmp_path / "r/hist.csv")
    run = eval_steering.EvalRun({"a": 1}, {"b": 2}, pd.DataFrame({"x": [1]}), [{"g": 0.5}],
                                {"total": 1.0})
    before = old_outputs([out.metrics, out.details, out.items, out.hist])
    monkeypatch.setattr("pandas.DataFrame.to_csv", full_disk)  # the second of four outputs
    with pytest.raises(UserError, match=f"cannot write {out.hist}: No space left"):
        eval_steering.write(run, out)
    assert_untouched(before)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    eval_steering.write(run, out)  # and with room on the disk, all four are replaced
    assert json.loads(out.metrics.read_text()) == {"a": 1}
    assert out.hist.read_text() == "g\n0.5\n"

    sout = eval_safety.Outputs(tmp_path / "s/m.json", tmp_path / "s/d.json",
                               tmp_path / "s/a.parquet", tmp_path / "s/p.png",
                               tmp_path / "s/b.csv", tmp_path / "s/t.png")
    r = {"rate": 0.1, "ci_low": 0.0, "ci_high": 0.2}
    result = eval_safety.SafetyRun(
        {"base": pd.DataFrame({"x": [1]})}, {"base": {"refusal_unsafe": r,
                                                      "over_refusal_safe": r}},
        {}, {"base": {"refusal_unsafe": 0.1}}, {"finetuned": {"n_experts_trained": 0}},
        "models/moe (test split)", "models/moe (test split): base", {"total": 1.0})
    before = old_outputs([sout.metrics, sout.details, sout.answers_judged, sout.plot_png,
                          sout.plot_csv, sout.tradeoff_png])
    real = write_json

    def details_fail(obj, path):  # the details, the 5th of 6 outputs
        if path.name.startswith(".d.json."):
            full_disk()
        real(obj, path)
    monkeypatch.setattr(eval_safety, "write_json", details_fail)
    with pytest.raises(UserError, match=f"cannot write {sout.details}: No space left"):
        eval_safety.write(result, sout)
    assert_untouched(before)


def test_staged_outputs_replace_directories_together(tmp_path):
    a, b = tmp_path / "model", tmp_path / "m.json"
    a.mkdir()
    (a / "old.txt").write_text("old")
    b.write_text("old")
    with pytest.raises(RuntimeError, match="bug"), staged_outputs() as staged:
        (staged.dir(a) / "w.txt").write_text("new")
        staged(b).write_text("new")
        raise RuntimeError("bug")
    assert (a / "old.txt").read_text() == "old" and b.read_text() == "old"
    with staged_outputs() as staged:
        (staged.dir(a) / "w.txt").write_text("new")
        write_json({"n": 1}, staged(b))
    assert sorted(p.name for p in a.iterdir()) == ["w.txt"]
    assert json.loads(b.read_text()) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "model"]
    assert oct(b.stat().st_mode & 0o777) == "0o644"


# ----------------------------------------------------------------------------- 9 (the rest)
def test_metrics_p_values_keep_significant_digits():
    from steerline.steermoe.safety.summary import headline_metrics

    r = {"rate": 0.5, "ci_low": 0.123456, "ci_high": 0.9}
    rates = {"v": {"refusal_unsafe": r, "over_refusal_safe": r}}
    comp = {"v": {"refusal_unsafe": {"p_value": 9.5367431640625e-07},
                  "over_refusal_safe": {"p_value": 0.0014896392822265625}}}
    head = headline_metrics({"v": {"refusal_unsafe": 0.123456}}, rates, comp)["v"]
    assert head["refusal_unsafe_mcnemar_p"] == 9.54e-07
    assert head["over_refusal_safe_mcnemar_p"] == 0.00149
    assert head["refusal_unsafe_ci_low"] == 0.1235  # the rates keep their 4 decimals


def test_top_k_larger_than_the_experts_is_named(moe_dir, tiny_moe, tokenizer):
    cfg = json.loads((moe_dir / "config.json").read_text())
    cfg["num_experts_per_tok"] = 32
    (moe_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"num_experts_per_tok=32 but the model has 8 experts "
                                         r"per layer: set num_experts_per_tok to 1..8"):
        moe_config(moe_dir)
    tiny_moe.config.num_experts_per_tok = 32
    with pytest.raises(ValueError, match="num_experts_per_tok=32"):
        TransformersBackend(tiny_moe, tokenizer)


def test_non_utf8_experts_file_names_the_file(tmp_path):
    bad = tmp_path / "experts.json"
    bad.write_bytes(b'{"unsafe": [], "safe": ["\xff"]}')
    with pytest.raises(ValueError, match=f"{bad} is not UTF-8 text"):
        read_experts_json(bad)


def test_stages_from_a_subfolder(capsys, monkeypatch):
    monkeypatch.chdir(ROOT / "docs")
    code, out, err = run_cli(capsys, "stages")
    assert code == 0, err
    assert out.splitlines()[0] == "build_models"


@pytest.mark.parametrize(("env", "want"), [(None, "WARNING"), ("DEBUG", "DEBUG")])
def test_vllm_log_level_defaults_to_warning(env, want):
    environ = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    if env is not None:
        environ["VLLM_LOGGING_LEVEL"] = env
    got = subprocess.run(
        [sys.executable, "-c", "import os, steerline.backends; "
                               "print(os.environ['VLLM_LOGGING_LEVEL'])"],
        env=environ, capture_output=True, text=True, check=True).stdout.strip()
    assert got == want


def test_check_context_names_each_prompt():
    from steerline.steering.capture import check_context

    check_context([[1] * 4, np.arange(5)], None, 3, 8)  # fits exactly
    with pytest.raises(ValueError, match="prompt '1' has 6 tokens"):
        check_context([[1] * 4, [1] * 6], None, 3, 8)
