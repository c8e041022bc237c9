"""MAT-Steer attributes from params.yaml's `attributes`: a user's file of (prompt, positive,
negative, group) rows beside the built-ins, through prepare_attributes, extract_activations,
train_steering, eval_baselines and eval_steering; its bad files; `dvc exp run -S` adding and
dropping one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from steerline.core.errors import UserError
from steerline.core.params import BUILTIN_ATTRIBUTES as BUILTINS
from steerline.core.params import Params, load_params, parse_params
from steerline.mat_steer.checkpoint import load_steering
from steerline.mat_steer.checks import check_splits
from steerline.model.gguf import save_model
from steerline.pipeline import (
    eval_baselines,
    eval_steering,
    extract_activations,
    prepare_attributes,
    train_steering,
)

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw"
EXAMPLE = "data/examples/formality/formality.jsonl"
RAW_INPUTS = prepare_attributes.Inputs(truthfulqa=RAW / "truthfulqa" / "mc_task.json",
                                       toxigen=RAW / "toxigen", bbq=RAW / "bbq")
FORMALITY = {"name": "formality", "path": str(ROOT / EXAMPLE), "test_fraction": 0.3}


def repo_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def params_with(attributes: list, **sections: dict) -> Params:
    """The repository's params with `attributes` and the given keys of some sections replaced."""
    raw = repo_raw()
    raw["attributes"] = attributes
    for section, keys in sections.items():
        raw[section] = {**raw[section], **keys}
    return parse_params(raw)


# ---------------------------------------------------------------------------- the table


def test_default_attributes_are_the_three_built_ins_in_todays_order():
    assert load_params(ROOT / "params.yaml").attribute_names == list(BUILTINS)


def test_user_attribute_beside_the_built_ins_leaves_them_unchanged():
    p = params_with([*BUILTINS, FORMALITY])
    both = prepare_attributes.prepare_attributes(RAW_INPUTS, p.prepare_attributes, p.seed,
                                                 p.attributes)
    alone = prepare_attributes.prepare_attributes(RAW_INPUTS, p.prepare_attributes, p.seed,
                                                  list(BUILTINS))
    assert list(both) == [*BUILTINS, "formality"]
    for task in BUILTINS:  # each attribute draws from its own seeded generator
        pd.testing.assert_frame_equal(both[task], alone[task])
    df = both["formality"]
    check_splits(df)
    rows = [json.loads(line) for line in (ROOT / EXAMPLE).read_text().splitlines()]
    assert len(df) == 2 * len(rows) and df["item_id"].nunique() == len(rows)
    first = df[df["item_id"] == "formality:00000"].set_index("label")
    assert list(first.loc["pos", "choices"]) == [rows[0]["positive"], rows[0]["negative"]]
    assert first.loc["pos", "correct_idx"] == 0
    assert first.loc["pos", "text"] == f"{rows[0]['prompt']} {rows[0]['positive']}"
    assert first.loc["neg", "text"] == f"{rows[0]['prompt']} {rows[0]['negative']}"
    # a topic's rows share one split; all three splits hold both labels
    assert (df.groupby("group_id")["split"].nunique() == 1).all()
    assert df.groupby("split")["label"].nunique().to_dict() == {"dev": 2, "test": 2, "train": 2}


# ---------------------------------------------------------------------------- bad files

GOOD = [{"prompt": f"Message: note {i}\nReply:", "positive": f"Certainly, note {i}.",
         "negative": f"yeah ok {i}", "group": f"g{i % 5}"} for i in range(12)]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def edit(i: int, **cells: object) -> str:
    return jsonl([{**r, **cells} if k == i else r for k, r in enumerate(GOOD)])


def test_csv_jsonl_and_parquet_files_give_one_table(tmp_path, data_roots):
    """One documented format in three containers; parquet may hold the groups as integers."""
    rows = [{**r, "group": i % 5} for i, r in enumerate(GOOD)]
    (tmp_path / "a.jsonl").write_text(jsonl(rows), encoding="utf-8")
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    tables = []
    for ext in ("jsonl", "csv", "parquet"):
        p = params_with([{"name": "mine", "path": str(tmp_path / f"a.{ext}"),
                          "test_fraction": 0.3}])
        tables.append(prepare_attributes.prepare_attributes(
            RAW_INPUTS, p.prepare_attributes, p.seed, p.attributes)["mine"])
    for other in tables[1:]:
        pd.testing.assert_frame_equal(tables[0], other)
    assert set(tables[0]["group_id"]) == {f"mine:{g}" for g in range(5)}


@pytest.mark.parametrize(("name", "content", "needles"), [
    ("missing.jsonl", None, ["not found: check the path"]),
    ("empty.jsonl", "", ["is empty", "add at least one prompt"]),
    ("nocol.jsonl", jsonl([{k: v for k, v in r.items() if k != "negative"} for r in GOOD]),
     ["line 1 has no key 'negative'", "columns (jsonl: keys) prompt, positive, negative"]),
    ("nocol.csv", pd.DataFrame(GOOD).drop(columns="group").to_csv(index=False),
     ["has no column 'group'", "prompt, positive, negative and group"]),
    ("blank.jsonl", edit(3, prompt="  "), ["line 4, column 'prompt', is a blank prompt"]),
    ("dup.jsonl", edit(5, prompt=GOOD[1]["prompt"]),
     ["line 6 repeats the prompt of line 2", "one row per prompt"]),
    ("blankneg.jsonl", edit(2, negative=""), ["line 3, column 'negative', is blank"]),
    ("nullpos.jsonl", edit(2, positive=None), ["line 3, column 'positive', is null"]),
    ("onelabel.jsonl", edit(7, negative=GOOD[7]["positive"]),
     ["line 8 has the same positive and negative completion", "one label only"]),
    ("nogroup.jsonl", edit(0, group=None),
     ["line 1, column 'group', holds null", "give every row a group"]),
    ("latin1.jsonl", edit(4, positive="Caf@").encode().replace(b"@", b"\xe9"),  # Latin-1
     ["line 5 is not UTF-8", "save the file as UTF-8"]),
    ("rows.txt", "a\nb\n", ["is a .txt file", "write it as csv, jsonl, parquet"]),
])
def test_a_bad_file_is_one_error_naming_it_and_nothing_is_written(tmp_path, data_roots, name,
                                                                 content, needles):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    p = params_with(["truthfulqa", {"name": "mine", "path": str(path), "test_fraction": 0.3}])
    out = prepare_attributes.Outputs(tmp_path / "attributes")
    with pytest.raises(UserError) as err:
        prepare_attributes.main(p, RAW_INPUTS, out)
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    assert not out.attributes.exists()  # not even the built-in's table


def test_too_few_groups_for_three_splits_is_named(tmp_path, data_roots):
    path = tmp_path / "one_group.jsonl"
    path.write_text(jsonl([{**r, "group": "all"} for r in GOOD]), encoding="utf-8")
    p = params_with([{"name": "mine", "path": str(path), "test_fraction": 0.3}])
    with pytest.raises(ValueError, match=f"mine: the .* split has labels .*add rows of new "
                                         f"groups to {path}, or change its test_fraction"):
        prepare_attributes.main(p, RAW_INPUTS, prepare_attributes.Outputs(tmp_path / "a"))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(("attributes", "match"), [
    (["truthfulqa", "truthfulqa"], "'truthfulqa' is listed twice"),
    ([{"name": "bbq", "path": EXAMPLE, "test_fraction": 0.3}], "takes a built-in's name"),
    ([{"name": "loss", "path": EXAMPLE, "test_fraction": 0.3}], "names train_steering's dev "),
    (["tqa"], "attributes.0.built-in': Input should be 'truthfulqa', 'toxigen' or 'bbq'"),
    ([{"name": "Formal", "path": EXAMPLE, "test_fraction": 0.3}], "attributes.0.file.name"),
    ([{"name": "formal", "path": EXAMPLE}], "attributes.0.file.test_fraction' is missing"),
    ([], "attributes': List should have at least 1 item"),
])
def test_bad_attribute_lists_are_params_errors(attributes, match):
    raw = repo_raw()
    raw["attributes"] = attributes
    with pytest.raises(ValueError, match=match):
        parse_params(raw)


def test_max_test_items_keys_must_be_attributes_and_a_missing_key_is_the_whole_split():
    raw = repo_raw()
    raw["attributes"] = ["truthfulqa", FORMALITY]
    raw["eval_steering"]["max_test_items"] = {"truthfulqa": 5, "formalty": 3}
    with pytest.raises(ValueError, match="max_test_items.formalty is neither a built-in nor"):
        parse_params(raw)
    raw["eval_steering"]["max_test_items"] = {"truthfulqa": 5}  # formality: the whole split
    assert parse_params(raw).eval_steering.max_test_items == {"truthfulqa": 5}


def test_under_dvc_a_user_file_must_lie_inside_a_dep_of_the_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DVC_STAGE", "prepare_attributes")
    inside = params_with([*BUILTINS, {**FORMALITY, "path": EXAMPLE}]).attributes
    prepare_attributes.check_files_are_deps(inside)  # data/examples is a dep
    outside = params_with([{**FORMALITY, "path": "data/mine/formality.jsonl"}]).attributes
    with pytest.raises(UserError, match="data/mine/formality.jsonl .* is not inside a dep of "
                                        "prepare_attributes in dvc.yaml: move it under "
                                        "data/examples/"):
        prepare_attributes.check_files_are_deps(outside)
    monkeypatch.delenv("DVC_STAGE")  # run by hand, no dvc.yaml promise to keep
    prepare_attributes.check_files_are_deps(outside)


def test_every_mat_steer_stage_reads_the_attributes_key():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ["prepare_attributes", "extract_activations", "train_steering",
                 "eval_baselines", "eval_steering"]:
        assert "attributes" in stages[name]["params"], name
    assert "data/examples" in stages["prepare_attributes"]["deps"]


def test_dvc_exp_run_set_param_adds_and_drops_an_attribute(tmp_path):
    """`dvc exp run -S` applies Hydra overrides to params.yaml (dvc.utils.hydra), then the
    stages read it: the documented commands give valid params."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", path)
    apply_overrides(path, [f"attributes=[truthfulqa,toxigen,bbq,{{name:formality,path:{EXAMPLE},"
                           "test_fraction:0.3}]"])
    p = load_params(path)
    assert p.attribute_names == [*BUILTINS, "formality"]
    assert p.attributes[3].path == EXAMPLE and p.attributes[3].test_fraction == 0.3
    apply_overrides(path, ["attributes=[truthfulqa,bbq]"])
    assert load_params(path).attribute_names == ["truthfulqa", "bbq"]


# ---------------------------------------------------------------------------- end to end


@pytest.fixture()
def tiny_base(tiny_dense, tokenizer, tmp_path) -> Path:
    save_model(tiny_dense, tokenizer, tmp_path / "base")
    return tmp_path / "base"


def test_user_attribute_trains_and_evaluates_like_a_built_in(tiny_base, tmp_path, data_roots,
                                                            monkeypatch):
    """ToxiGen and the formality example through every MAT-Steer stage on a tiny Llama: one
    steering vector and gate each, the baselines and MAT-Steer scored on both, and
    formality_acc paired and reported like toxigen_acc."""
    monkeypatch.chdir(tmp_path)  # reports/timings
    p = params_with(
        ["toxigen", FORMALITY],
        prepare_attributes={"max_items": {"train": 40, "dev": 10, "test": 10}},
        extract_activations={"layer": 0, "batch_size": 16},
        train_steering={"epochs": 3, "batch_size": 16},
        eval_steering={"mean_diff_scales": [1.0], "mat_scales": [1.0], "n_bootstrap": 100,
                       "max_dev_items": 5})
    attrs, acts = tmp_path / "attributes", tmp_path / "activations"
    ckpt, live, base = tmp_path / "mat_steer", tmp_path / "live", tmp_path / "baselines"
    prepare_attributes.main(p, RAW_INPUTS, prepare_attributes.Outputs(attrs))
    extract_activations.main(p, extract_activations.Inputs(str(tiny_base), attrs),
                             extract_activations.Outputs(acts))
    assert sorted(f.name for f in acts.iterdir()) == [
        "formality.npy", "formality.parquet", "toxigen.npy", "toxigen.parquet"]
    trained = train_steering.run(p, train_steering.Inputs(acts),
                                 train_steering.Outputs(ckpt, live))
    module, config = load_steering(ckpt)
    assert config.attributes == ["toxigen", "formality"] == trained.config.attributes
    assert tuple(module.steering_vectors.shape) == (2, 32)  # one vector per attribute, [T, D]
    assert set(config.training["gate_temperatures"]) == {"toxigen", "formality"}
    eval_baselines.main(p, eval_baselines.Inputs(attrs, acts), eval_baselines.Outputs(base))
    values = pd.read_parquet(base / "values.parquet")
    assert set(values["metric"]) == {"toxigen_acc", "formality_acc"}
    assert set(values["condition"]) == {"base", "mean_diff", "single_attribute"}
    result = eval_steering.run(p, eval_steering.Inputs(attrs, acts, ckpt, base))
    m = result.metrics
    for cond in ("base", "mean_diff", "single_attribute", "mat_steer"):
        assert list(m[cond]) == ["toxigen_acc", "formality_acc", "average"], cond
    assert set(m["paired"]["mat_steer_minus_base"]) == {"toxigen_acc", "formality_acc",
                                                        "average"}
    assert list(m["gates"]) == ["toxigen", "formality"]
    assert 0.0 <= m["gates"]["formality"]["gate_auroc"] <= 1.0
    n_test = result.details["n_test_items"]["formality"]
    assert n_test == (result.items["metric"] == "formality_acc").sum() / 4  # 4 conditions
    assert {"formality_pos", "formality_neg"} <= set(result.hist[0])

    # the checkpoint steers what it was trained on: params that drop an attribute are refused
    dropped = params_with(["toxigen"], eval_steering=p.eval_steering.model_dump())
    with pytest.raises(ValueError, match=r"steers the attributes \['toxigen', 'formality'\], "
                                         r"params.yaml lists \['toxigen'\]: re-run"):
        eval_steering.run(dropped, eval_steering.Inputs(attrs, acts, ckpt, base))
