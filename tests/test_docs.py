"""README.md and docs/*.md: the generated results equal the committed reports, a missing report
or key stops the generator (never "n/a"), the README stays short, links resolve, and the dev
sweep's documented picks are the params in use."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tools.docs_results import (
    BLOCKS,
    WRITERS,
    DocError,
    ReportError,
    Reports,
    block_names,
    doc_files,
    main,
    regenerate,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
MAKE_DOCS = "run `make docs` (python -m tools.docs_results) and commit the result"


def copy_project(dst: Path) -> Path:
    """README.md, docs/ and the reports the generator reads, under dst."""
    shutil.copy(ROOT / "README.md", dst / "README.md")
    shutil.copytree(ROOT / "docs", dst / "docs")
    for rel in WRITERS:
        (dst / "reports" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "reports" / rel, dst / "reports" / rel)
    return dst


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def doc_texts(root: Path) -> dict[Path, str]:
    return {p: p.read_text() for p in doc_files(root)}


# ------------------------------------------------------------------- (a) docs equal the reports
def test_committed_docs_equal_what_the_committed_reports_render():
    stale = [str(p.relative_to(ROOT)) for p, (old, new) in regenerate(ROOT).items() if old != new]
    assert not stale, f"generated results in {', '.join(stale)} differ from reports/: {MAKE_DOCS}"


def test_every_block_is_used_exactly_once():
    used = [name for p in doc_files(ROOT) for name in block_names(p.read_text())]
    assert sorted(used) == sorted(BLOCKS), (
        f"blocks used {sorted(used)} vs defined {sorted(BLOCKS)}: each block of "
        "tools/docs_results.py belongs in exactly one place of README.md or docs/*.md")


def test_a_changed_report_makes_the_docs_stale_until_make_docs(tmp_path, capsys):
    root = copy_project(tmp_path)
    edit_json(root / "reports/moefy.json", lambda m: m.update(top1_agreement=0.6123))
    assert main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "README.md" in err and "docs/results.md" in err and "make docs" in err
    assert "0.612" not in (root / "docs/results.md").read_text()  # --check writes nothing
    assert main(["--root", str(root)]) == 0
    assert "top-1 agreement 0.612" in (root / "README.md").read_text()
    assert "| 0.612 |" in (root / "docs/results.md").read_text()
    assert main(["--check", "--root", str(root)]) == 0


def test_text_outside_blocks_is_kept_byte_for_byte():
    reports = Reports(ROOT)
    text = ("intro 1.23\n<!-- results: moefy -->\nstale\n<!-- /results -->\nmiddle\n"
            "<!-- results: contrast_weight --><!-- /results -->tail")
    out = render(text, reports)
    assert out.startswith("intro 1.23\n<!-- results: moefy -->\n\n| MoEfication")
    assert "stale" not in out and "\n<!-- /results -->\nmiddle\n" in out
    assert out.endswith("= 0.60.\n\n_Generated from `reports/risk_diff_summary.json` by "
                        "`make docs`._\n\n<!-- /results -->tail")
    assert render(out, reports) == out


@pytest.mark.parametrize("text, message", [
    ("<!-- results: no_such_block -->\n<!-- /results -->", "unknown block 'no_such_block'"),
    ("<!-- results: moefy -->\nx", "block 'moefy' is not closed"),
    ("<!-- /results -->", "without an opening marker"),
    ("<!-- results: moefy -->\n<!-- results: splits -->\n<!-- /results -->",
     "'moefy' is not closed before"),
])
def test_malformed_markers_are_errors(text, message):
    with pytest.raises(DocError, match=re.escape(message)):
        render(text, Reports(ROOT))


# ------------------------------------------------------- (b) missing reports and keys fail loudly
@pytest.mark.parametrize("rel", sorted(WRITERS))
def test_a_missing_report_stops_the_generator_and_writes_nothing(tmp_path, rel):
    root = copy_project(tmp_path)
    (root / "reports" / rel).unlink()
    before = doc_texts(root)
    with pytest.raises(ReportError) as err:
        main(["--root", str(root)])
    assert f"reports/{rel} not found" in str(err.value)
    assert WRITERS[rel] in str(err.value) and "make docs" in str(err.value)
    assert doc_texts(root) == before


@pytest.mark.parametrize("rel, keys", [
    ("mat_steer_eval.json", ("gates", "truthfulqa", "probe_auroc")),
    ("safety_eval_details.json", ("comparisons", "finetuned_activate", "refusal_unsafe",
                                  "p_value")),
    ("risk_diff_summary.json", ("agreement", "pooled_matched", "spearman")),
    ("train_steering/metrics.json", ("dev", "bbq", "gate_median_pos")),
    ("experts_finetuned_summary.json", ("n_safe_beyond_null",)),
])
def test_a_missing_key_names_the_file_and_key(tmp_path, rel, keys):
    root = copy_project(tmp_path)

    def drop(obj):
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]

    edit_json(root / "reports" / rel, drop)
    before = doc_texts(root)
    with pytest.raises(ReportError) as err:
        main(["--root", str(root)])
    assert f"reports/{rel}: no key '{'.'.join(keys)}'" in str(err.value)
    assert WRITERS[rel] in str(err.value)
    assert doc_texts(root) == before


@pytest.mark.parametrize("value", [None, float("nan"), "0.5"])
def test_a_number_that_is_not_a_number_is_an_error_not_na(tmp_path, value):
    root = copy_project(tmp_path)
    edit_json(root / "reports/moefy.json", lambda m: m.update(mean_kl=value))
    with pytest.raises(ReportError, match=r"reports/moefy\.json: 'mean_kl' is .*not a number"):
        regenerate(root)


def test_a_missing_csv_column_is_an_error(tmp_path):
    root = copy_project(tmp_path)
    path = root / "reports/safety_dev_sweep.csv"
    path.write_text(path.read_text().replace("refusal_unsafe_mcnemar_p", "p", 1))
    with pytest.raises(ReportError, match="safety_dev_sweep.csv: no column "
                                          "'refusal_unsafe_mcnemar_p'"):
        regenerate(root)


def test_a_summary_that_does_not_fit_its_schema_is_an_error(tmp_path):
    root = copy_project(tmp_path)
    edit_json(root / "reports/summary.json", lambda s: s["dev_sweep"].pop("finetune_pick"))
    with pytest.raises(ReportError, match=r"reports/summary\.json does not fit its schema: "
                                          r"dev_sweep\.finetune_pick: Field required \(rerun "
                                          r"the summarize stage"):
        regenerate(root)


def test_a_summary_naming_runs_the_sweep_lacks_is_an_error(tmp_path):
    root = copy_project(tmp_path)
    edit_json(root / "reports/summary.json",
              lambda s: s["dev_sweep"].update(finetune=["finetuned(9) lr9e-9"]))
    with pytest.raises(ReportError, match=r"names runs not in reports/safety_dev_sweep\.csv: "
                                          r"'finetuned\(9\) lr9e-9'"):
        regenerate(root)


def test_the_docs_tool_computes_nothing_it_imports_only_formats_and_records():
    """Every number it shows is a stage's: its steerline imports are the formats, the atomic
    writer and summary.json's record, never a method's code (as GATE_GOALS once was)."""
    tree = ast.parse((ROOT / "tools/docs_results.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and n.module and n.module.startswith("steerline")}
    assert imported == {"steerline.core.io", "steerline.core.tables",
                        "steerline.pipeline.summary_records"}


# ------------------------------------------------------------------------- (c) a short README
def test_readme_is_under_250_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n < 250, f"README.md has {n} lines: move detail to docs/"


# ----------------------------------------------------------------------- (d) links that resolve
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for doc in doc_files(ROOT):
        for target in LINK.findall(FENCE.sub("", doc.read_text())):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slug_matches_github_anchors():
    assert slug("Which experts: `select_experts.require: both`") == \
        "which-experts-select_expertsrequire-both"
    assert slug("MAT-Steer: why the published objective's gates fail") == \
        "mat-steer-why-the-published-objectives-gates-fail"


# ------------------------------------------------- no measured number outside the generated blocks
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?%?(?![\w.])")
#: decimals that may stand in prose: constants, versions and values of other code, not results
ALLOWED = {
    "0.32": "vLLM's version", "3.11": "Python's version",
    "1.5": "bench goal", "1.10": "bench goal", "99.5%": "bench equality criterion",
    "95%": "interval level", "1e-50": "a test fixture's token-level q",
    "5e-5": "the SteerMoE reference code's lr", "2e-4": "a superseded lr",
    "0.4375": "MAT-Steer's layer ratio 14/32", "0.8": "a superseded gate_target",
    "85%": "the prompt gate goal's bound (steermoe.safety.goals.GATE_GOAL)",
}


def _param_values(node) -> set[float]:
    if isinstance(node, dict):
        return set().union(*(_param_values(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_param_values(v) for v in node)) if node else set()
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return {float(node)}
    return set()


def test_prose_quotes_no_measured_number():
    """Outside the generated blocks and code, a decimal or a percentage is a params.yaml value
    or a listed constant. docs/ablations.md is the log of one-off measurements (no report holds
    them) and is exempt."""
    params = _param_values(yaml.safe_load((ROOT / "params.yaml").read_text()))
    found = []
    for doc in doc_files(ROOT):
        if doc.name == "ablations.md":
            continue
        inside, fence = False, False
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                fence = not fence
            marker = re.search(r"<!-- (results: [a-z0-9_]+|/results) -->", line)
            if marker:
                inside = marker.group(1) != "/results"
                continue
            if inside or fence:
                continue
            for tok in NUMBER.findall(line):
                if not re.search(r"[.e%]", tok) or tok in ALLOWED:
                    continue
                if float(tok.rstrip("%")) not in params:
                    found.append(f"{doc.relative_to(ROOT)}:{n}: {tok}")
    assert not found, ("numbers outside generated blocks (put them in a block of "
                       "tools/docs_results.py, or list a constant in ALLOWED):\n"
                       + "\n".join(found))


# ----------------------------------------------------------- the documented dev picks are in use
def test_the_dev_rules_picks_are_the_params_in_use():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    reports = Reports(ROOT)
    s = reports.summary().dev_sweep
    lr = re.search(r"lr(\S+)", s.finetune_pick)
    assert lr and float(lr.group(1)) == params["finetune_experts"]["lr"], s.finetune_pick
    steerings = reports.csv("safety_dev_sweep.csv", ["steering"]).set_index("run")["steering"]
    assert {s.deactivate_pick, s.activate_pick} <= set(s.finetuned_steering)
    assert s.base_steering_pick in s.base_steering

    def steering(run: str | None) -> dict:
        assert run is not None
        return json.loads(steerings[run])

    for direction, pick in (("deactivate", s.deactivate_pick), ("activate", s.activate_pick)):
        got = steering(pick)
        want = params["finetuned_steering"][direction]
        assert (got["direction"], got["n_experts"], got["delta"]) == \
            (direction, want["n_experts"], want["delta"]), pick
    got, want = steering(s.base_steering_pick), params["expert_steering"]
    assert (got["mode"], got["n_experts"], got["delta"]) == \
        (want["mode"], want["n_experts"], want["delta"])
