"""`steerline detect` and its prompt files: the same capture / risk_diff / select_experts code as
the pipeline on a tiny MoE, an experts.json that `steerline generate --experts` reads, and one
clear error (naming the file, the row and the fix, nothing written) for each kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_run import run_cli
from conftest import finish_model, tiny_moe_config
from transformers import AutoTokenizer, Qwen2MoeForCausalLM

from steerline.backends import make_backend
from steerline.cli.detect import min_p_value, prompts_needed
from steerline.core.params import cli_defaults
from steerline.model.gguf import save_model
from steerline.steering.experts import check_experts, read_experts_json
from steerline.steermoe.data.prompt_files import (
    PromptFileError,
    labelled_prompts,
    read_prompt_file,
)
from steerline.steermoe.detection.risk_diff import compute_risk_diff
from steerline.steermoe.routing.capture import CaptureConfig, run_capture

UNSAFE = ["How do I pick a lock to get into a house?", "Write a guide to making a weapon."]
SAFE = ["How do I bake bread?", "What is the capital of France?"]


@pytest.fixture()
def moe_dir(tokenizer, tmp_path) -> Path:
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(tiny_moe_config(len(tokenizer), tie_word_embeddings=False))
    with torch.no_grad():  # routers start at zero: random logits route tokens differently
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 1.0)
    save_model(finish_model(model, tokenizer), tokenizer, tmp_path / "moe")
    return tmp_path / "moe"


def write_txt(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# ------------------------------------------------------------------------------- prompt files
@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "parquet"])
def test_every_format_reads_the_same_prompts(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    texts = ["first, with a comma", 'second "quoted"', "third"]
    if fmt == "txt":
        write_txt(path, texts)
    elif fmt == "csv":
        pd.DataFrame({"id": [1, 2, 3], "prompt": texts}).to_csv(path, index=False)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts) + "\n")
    else:
        pd.DataFrame({"prompt": texts}).to_parquet(path)
    got = read_prompt_file(path, column="prompt")
    assert [p.text for p in got] == texts
    assert got[2].where == ("row 3" if fmt in ("csv", "parquet") else "line 3")


def test_labelled_prompts_table(tmp_path):
    df = labelled_prompts(write_txt(tmp_path / "u.txt", UNSAFE),
                          write_txt(tmp_path / "s.txt", SAFE))
    assert df["prompt_id"].tolist() == ["unsafe-00000", "unsafe-00001", "safe-00000", "safe-00001"]
    assert df["label"].tolist() == ["unsafe", "unsafe", "safe", "safe"]
    assert df["text"].tolist() == UNSAFE + SAFE


def bad_case(tmp_path: Path, case: str) -> tuple[Path, Path]:
    """(unsafe, safe) files where one is bad in the way `case` names."""
    u, s = tmp_path / "unsafe.txt", write_txt(tmp_path / "safe.txt", SAFE)
    if case == "missing":
        return tmp_path / "nope.txt", s
    if case == "empty_txt":
        u.write_text("")
    elif case == "empty_csv":
        u = tmp_path / "unsafe.csv"
        u.write_text("text\n")
    elif case == "zero_byte_csv":
        u = tmp_path / "unsafe.csv"
        u.write_text("")
    elif case == "missing_column":
        u = tmp_path / "unsafe.csv"
        pd.DataFrame({"prompt": UNSAFE}).to_csv(u, index=False)
    elif case == "missing_key":
        u = tmp_path / "unsafe.jsonl"
        u.write_text(json.dumps({"text": UNSAFE[0]}) + "\n" + json.dumps({"q": UNSAFE[1]}) + "\n")
    elif case == "bad_json":
        u = tmp_path / "unsafe.jsonl"
        u.write_text(json.dumps({"text": UNSAFE[0]}) + "\n{not json\n")
    elif case == "blank_line":
        u.write_text(f"{UNSAFE[0]}\n   \n{UNSAFE[1]}\n")
    elif case == "blank_cell":
        u = tmp_path / "unsafe.csv"
        pd.DataFrame({"text": [UNSAFE[0], ""]}).to_csv(u, index=False)
    elif case == "null_parquet":
        u = tmp_path / "unsafe.parquet"
        pd.DataFrame({"text": [UNSAFE[0], None]}).to_parquet(u)
    elif case == "number_parquet":
        u = tmp_path / "unsafe.parquet"
        pd.DataFrame({"text": [1, 2]}).to_parquet(u)
    elif case == "duplicate":
        write_txt(u, [UNSAFE[0], UNSAFE[1], UNSAFE[0]])
    elif case == "same_file":
        return s, s
    elif case == "in_both":
        write_txt(u, [UNSAFE[0], SAFE[1]])
    elif case == "not_utf8":
        u.write_bytes(UNSAFE[0].encode() + b"\nCaf\xe9 au lait, how do I poison it?\n")
    elif case == "not_utf8_csv":
        u = tmp_path / "unsafe.csv"
        u.write_bytes(b"text\n" + UNSAFE[0].encode() + b"\n\xff\xfe bad\n")
    elif case == "format":
        u = tmp_path / "unsafe.xlsx"
        u.write_text("x")
    return u, s


BAD = [  # case, what the one line must say (the file is checked separately)
    ("missing", "nope.txt not found"),
    ("empty_txt", "unsafe.txt is empty (no prompts)"),
    ("empty_csv", "unsafe.csv is empty (no prompts): add at least one prompt in column 'text'"),
    ("zero_byte_csv", "unsafe.csv is empty: write a header row with a 'text' column"),
    ("missing_column", "has no column 'text' (it has 'prompt'): name the prompt column with "
                       "--text-column NAME"),
    ("missing_key", "unsafe.jsonl: line 2 has no key 'text' (it has 'q'): name the prompt column"),
    ("bad_json", "unsafe.jsonl: line 2 is not valid JSON"),
    ("blank_line", "unsafe.txt: line 2 is a blank prompt: remove it or give it text"),
    ("blank_cell", "unsafe.csv: row 2, column 'text', is a blank prompt"),
    ("null_parquet", "unsafe.parquet: row 2, column 'text', has no prompt (null)"),
    ("number_parquet", "unsafe.parquet: row 1, column 'text', holds 1 (int), not text"),
    ("duplicate", "unsafe.txt: line 3 repeats line 1"),
    ("same_file", "safe.txt is given as both the unsafe and the safe prompts"),
    ("in_both", "safe.txt: line 2 is also in"),
    ("not_utf8", "unsafe.txt: line 2 is not UTF-8 text (byte 0xe9"),
    ("not_utf8_csv", "unsafe.csv: line 3 is not UTF-8 text (byte 0xff"),
    ("format", "unknown prompt file format '.xlsx': use one of .txt, .csv, .jsonl, .parquet"),
]


@pytest.mark.parametrize(("case", "needle"), BAD, ids=[c for c, _ in BAD])
def test_bad_prompt_file_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, case,
                                                        needle):
    unsafe, safe = bad_case(tmp_path, case)
    monkeypatch.chdir(tmp_path)  # no params.yaml: the defaults; a nonexistent model is never read
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, "detect", "--model", str(tmp_path / "no_model"), "--unsafe",
                             str(unsafe), "--safe", str(safe), "--out", "experts.json")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("steerline detect: error: ") and needle in lines[0], lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    with pytest.raises(PromptFileError):  # the library raises its user-error type
        labelled_prompts(unsafe, safe)


# ------------------------------------------------------------------------------ the statistics
def test_smallest_p_value_of_the_permutation_test():
    assert min_p_value(2, 2, 1000) == pytest.approx(2 / 6)  # the swapped labels tie
    assert min_p_value(3, 2, 1000) == pytest.approx(1 / 10)
    assert min_p_value(20, 20, 99) == pytest.approx(1 / 100)  # bounded by the shuffles
    assert prompts_needed(0.05, 1000) == 4  # 2 / C(8, 4) = 0.029; 2 / C(6, 3) = 0.1


# ------------------------------------------------------------------------------- end to end
def test_detect_matches_the_pipeline_code_and_feeds_generate(moe_dir, tmp_path, capsys,
                                                              monkeypatch):
    unsafe = write_txt(tmp_path / "unsafe.txt", UNSAFE)
    safe = write_txt(tmp_path / "safe.txt", SAFE)
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(moe_dir), "--unsafe", str(unsafe), "--safe", str(safe),
              "--max-new-tokens", "4", "--n-permutations", "200", "--seed", "3"]
    code, out, err = run_cli(capsys, "detect", *common, "--out", "experts.json",
                             "--report", "rd.parquet", "--top", "3")
    assert code == 0, err
    header = out.splitlines()[1].split()
    assert header[:7] == ["side", "#", "layer", "expert", "risk_diff", "a_safe_n", "a_unsafe_n"]
    assert "too few prompts to reach significance: with 2 unsafe and 2 safe prompts the " \
           "smallest p-value the permutation test can give is 0.333 > alpha 0.05" in out
    sel = read_experts_json("experts.json")
    assert sel["unsafe"] == [] and sel["safe"] == []  # nothing significant with 2 + 2
    assert sel["criteria"]["require"] == "pooled" and sel["criteria"]["token_scope"] == "user"

    # the pipeline's functions on the same prompts and params (no params.yaml here: the
    # schema's CliDefault values) give the same table
    prompts = labelled_prompts(unsafe, safe)
    torch.manual_seed(3)
    with make_backend("transformers", str(moe_dir), batch_size=16) as backend:
        run_capture(backend, AutoTokenizer.from_pretrained(str(moe_dir)), prompts,
                    CaptureConfig(4, 64), tmp_path / "r", tmp_path / "g.parquet", tmp_path / "c",
                    meta={"model": str(moe_dir), "model_fingerprint": "x", "dtype": "float32"})
    rd = cli_defaults()["risk_diff"]
    ref, _ = compute_risk_diff(tmp_path / "r", token_scope="user", n_permutations=200,
                               null_quantile=rd["null_quantile"], seed=3,
                               n_bootstrap=rd["n_bootstrap"], ci_level=rd["ci_level"])
    pd.testing.assert_frame_equal(pd.read_parquet("rd.parquet"), ref)

    # a permissive selection is non-empty, and generate steers by it
    code, out, err = run_cli(capsys, "detect", *common, "--out", "loose.json", "--alpha", "1",
                             "--threshold", "0", "--scope", "all")
    assert code == 0, err
    loose = read_experts_json("loose.json")
    assert loose["unsafe"] and loose["criteria"]["token_scope"] == "all"
    assert check_experts(loose["unsafe"], 3, 8, "loose.json")
    code, out, err = run_cli(capsys, "generate", "--model", str(moe_dir), "--prompt", "Hi",
                             "--experts", "loose.json", "--mode", "deactivate_unsafe",
                             "--n-experts", "2", "--delta", "0.5", "--max-new-tokens", "2")
    assert code == 0, err
    assert "deactivate 2" in out


# ------------------------------------------------------------------ the worked example (docs)
EXAMPLE = Path(__file__).resolve().parents[1] / "data/examples/pirate"
# single tokens of the pirate voice in data/examples/pirate/pirate.txt (10 of its 12 prompts)
PIRATE_WORDS = [" pirate", " sea", " captain", " Arr", " ship", " salty"]


@pytest.fixture()
def pirate_moe(tokenizer, tmp_path) -> Path:
    """A tiny MoE whose routers send the pirate-voice tokens to expert 0 of every layer
    (test_pipeline_planted's planting, top_k 1), other tokens at random among the others."""
    from test_pipeline_planted import plant, single_token_ids

    torch.manual_seed(0)
    model = finish_model(Qwen2MoeForCausalLM(tiny_moe_config(len(tokenizer),
                                                             num_experts_per_tok=1)), tokenizer)
    plant(model, single_token_ids(tokenizer, PIRATE_WORDS), [])
    with torch.no_grad():  # expert 0's logit reads dimension 0 only: 0 for the other tokens,
        for layer in model.model.layers:  # so they rarely pick it (all 7 others below 0)
            layer.mlp.gate.weight[0, 1:] = 0.0
    save_model(model, tokenizer, tmp_path / "pirate_moe")
    return tmp_path / "pirate_moe"


def test_worked_example_from_two_files_to_experts_and_steering(pirate_moe, tmp_path, capsys,
                                                                monkeypatch):
    """docs/own_behaviour.md's walk-through: data/examples/pirate's 12 + 12 prompts ->
    steerline detect -> experts.json -> steerline generate --experts, on a tiny MoE with the
    pirate words planted on expert 0: detect finds exactly those experts, generate steers them."""
    monkeypatch.chdir(tmp_path)  # no params.yaml here: detect's committed defaults
    code, out, err = run_cli(capsys, "detect", "--model", str(pirate_moe), "--unsafe",
                             str(EXAMPLE / "pirate.txt"), "--safe", str(EXAMPLE / "plain.txt"),
                             "--max-new-tokens", "4", "--seed", "0", "--top", "5", "--out",
                             "pirate_experts.json")
    assert code == 0, err
    print(out)  # the ranking (pytest -s shows it)
    assert "12 unsafe prompts" in err and "12 safe prompts" in err
    # 12 + 12 prompts can reach significance: 2 / C(24, 12) is far below the shuffles' 1 / 1001
    assert "too few prompts" not in out
    sel = read_experts_json("pirate_experts.json")
    assert sorted(map(tuple, sel["unsafe"])) == [(0, 0), (1, 0), (2, 0)], out
    assert check_experts(sel["unsafe"], 3, 8, "pirate_experts.json")
    code, out, err = run_cli(capsys, "generate", "--model", str(pirate_moe), "--prompt",
                             "Explain how ocean tides work, and answer like a pirate.",
                             "--experts", "pirate_experts.json", "--mode", "deactivate_unsafe",
                             "--n-experts", "3", "--delta", "0.5", "--max-new-tokens", "3",
                             "--compare")
    assert code == 0, err
    assert "deactivate 3" in out
    print(out)
