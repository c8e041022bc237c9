"""The results in README.md and docs/*.md, generated from the committed reports.

    python -m tools.docs_results            rewrite every generated block (`make docs`)
    python -m tools.docs_results --check    exit 1, naming the stale files, without writing

A generated block is everything between an opening marker comment `results: NAME` and the next
closing marker comment `/results` (HTML comments, so the Markdown renders without them). NAME is
one of BLOCKS; each block is rendered from reports/ alone, so a number in the docs is the number
in the report that the stage wrote. Prose outside the blocks quotes no measured number.

This tool computes no number: it selects and formats. What the docs show that no other stage
writes (the dev sweep's groups and picks, the style weight, MAT-Steer's goal margins, verdicts,
changed items and scale positions) is computed by the summarize stage into reports/summary.json
(steerline.pipeline.summarize), read back here as its typed record; the formats are
steerline.core.tables, the CI report's.

Nothing is filled in when a report is missing, unreadable or lacks a key, or holds null / NaN
where a number belongs: ReportError names the file, the key and the stage that writes it, and no
file is written (every block of every file is rendered before the first write).
tests/test_docs.py checks that the committed docs equal what this renders from the committed
reports.
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from pydantic import ValidationError

from steerline.core.io import atomic_path
from steerline.core.tables import f3, md_table, p_value, pct, signed, yes_no
from steerline.pipeline.summary_records import Summary, read_summary

MARKER = re.compile(r"<!-- (?:results: ([a-z0-9_]+)|/results) -->")

#: report (relative to reports/) -> what writes it, named in every error about it
WRITERS = {
    "moefy.json": "the build_models stage",
    "risk_diff_summary.json": "the risk_diff@base stage",
    "risk_diff_finetuned_summary.json": "the risk_diff@finetuned stage",
    "experts_summary.json": "the select_experts@base stage",
    "experts_finetuned_summary.json": "the select_experts@finetuned stage",
    "safety_eval.json": "the eval_safety stage",
    "safety_eval_details.json": "the eval_safety stage",
    "mat_steer_eval.json": "the eval_steering stage",
    "mat_steer_eval_details.json": "the eval_steering stage",
    "train_steering/metrics.json": "the train_steering stage",
    "finetune_experts/metrics.json": "the finetune_experts stage",
    "safety_dev_sweep.csv": "scripts/safety_dev_sweep.py (see docs/choices.md)",
    "gate_dev.json": "the train_gate@base stage",
    "gate_finetuned_dev.json": "the train_gate@finetuned stage",
    "seeds.json": "`make seeds` (python -m steerline.report.seeds)",
    "summary.json": "the summarize stage",
}

ATTRIBUTES = {"truthfulqa": "TruthfulQA", "toxigen": "ToxiGen", "bbq": "BBQ"}
METRICS = {"truthfulqa_mc1": "MC1", "truthfulqa_mc2": "MC2", "bbq_acc": "BBQ",
           "toxigen_acc": "ToxiGen", "average": "average"}
CONDITIONS = {"base": "base", "mean_diff": "mean-diff",
              "single_attribute": "single-attribute mean-diff", "mat_steer": "MAT-Steer"}
SHORT = {"mat_steer": "MAT", "mean_diff": "mean-diff", "base": "base",
         "single_attribute": "single-attribute"}
#: where a chosen MAT-Steer scale sits among those its dev sweep tried (summary.json)
SCALE_POSITION = {"largest": "largest tried", "smallest": "smallest tried",
                  "inside": "inside the grid"}


class ReportError(RuntimeError):
    """A report the docs need is missing or incomplete: rerun what writes it, then `make docs`."""


class DocError(ValueError):
    """A doc's markers are malformed or name no known block."""


# ------------------------------------------------------------------------------------ reports
def _fix(rel: str) -> str:
    return f"rerun {WRITERS.get(rel, 'the stage that writes it')}, then `make docs`"


@dataclass(frozen=True)
class Node:
    """A value read from a JSON report, with where it came from for error messages."""

    value: Any
    file: str
    where: tuple[str, ...] = ()

    def _key(self, keys: Sequence[str]) -> str:
        return ".".join((*self.where, *keys))

    def at(self, *keys: str) -> Node:
        v = self.value
        for i, k in enumerate(keys):
            if not isinstance(v, Mapping) or k not in v:
                raise ReportError(f"reports/{self.file}: no key {self._key(keys[:i + 1])!r} "
                                  f"({_fix(self.file)})")
            v = v[k]
        return Node(v, self.file, (*self.where, *keys))

    def num(self, *keys: str) -> float:
        v = self.at(*keys).value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ReportError(f"reports/{self.file}: {self._key(keys)!r} is {v!r}, not a number "
                              f"({_fix(self.file)})")
        return float(v)

    def count(self, *keys: str) -> int:
        v = self.at(*keys).value
        if isinstance(v, bool) or not isinstance(v, int):
            raise ReportError(f"reports/{self.file}: {self._key(keys)!r} is {v!r}, not a count "
                              f"({_fix(self.file)})")
        return v

    def text(self, *keys: str) -> str:
        v = self.at(*keys).value
        if not isinstance(v, str) or not v:
            raise ReportError(f"reports/{self.file}: {self._key(keys)!r} is {v!r}, not a "
                              f"non-empty string ({_fix(self.file)})")
        return v

    def flag(self, *keys: str) -> bool:
        v = self.at(*keys).value
        if not isinstance(v, bool):
            raise ReportError(f"reports/{self.file}: {self._key(keys)!r} is {v!r}, not true or "
                              f"false ({_fix(self.file)})")
        return v

    def keys(self) -> list[str]:
        if not isinstance(self.value, Mapping) or not self.value:
            raise ReportError(f"reports/{self.file}: {self._key(()) or 'the file'!r} is not a "
                              f"non-empty object ({_fix(self.file)})")
        return list(self.value)


class Reports:
    """The files under ROOT/reports, each read once."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "reports"
        self._json: dict[str, Node] = {}
        self._tables: dict[str, pd.DataFrame] = {}
        self._summary: Summary | None = None

    def _path(self, rel: str) -> Path:
        path = self.dir / rel
        if not path.is_file():
            raise ReportError(f"reports/{rel} not found ({_fix(rel)})")
        return path

    def json(self, rel: str) -> Node:
        if rel not in self._json:
            try:
                self._json[rel] = Node(json.loads(self._path(rel).read_text()), rel)
            except json.JSONDecodeError as err:
                raise ReportError(f"reports/{rel} is not valid JSON: {err} ({_fix(rel)})") from None
        return self._json[rel]

    def summary(self) -> Summary:
        """reports/summary.json as the summarize stage's record."""
        rel = "summary.json"
        if self._summary is None:
            try:
                self._summary = read_summary(self._path(rel))
            except ValidationError as err:
                msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                for e in err.errors())
                raise ReportError(f"reports/{rel} does not fit its schema: {msg} "
                                  f"({_fix(rel)})") from None
            except json.JSONDecodeError as err:
                raise ReportError(f"reports/{rel} is not valid JSON: {err} ({_fix(rel)})") from None
        return self._summary

    def csv(self, rel: str, columns: Iterable[str]) -> pd.DataFrame:
        if rel not in self._tables:
            self._tables[rel] = pd.read_csv(self._path(rel))
        df = self._tables[rel]
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ReportError(f"reports/{rel}: no column {', '.join(map(repr, missing))} "
                              f"({_fix(rel)})")
        return df


V = TypeVar("V")


def summary_entry(entries: Mapping[str, V], key: str, what: str) -> V:
    """summary.json's entry for `key` (an attribute, metric, ...), or a ReportError."""
    if key not in entries:
        raise ReportError(f"reports/summary.json: no {what} {key!r} ({_fix('summary.json')})")
    return entries[key]


# --------------------------------------------------------------------------------- formatting
def source_line(*rels: str) -> str:
    files = ", ".join(f"`reports/{r}`" for r in rels)
    return f"_Generated from {files} by `make docs`._"


def rate_cell(rate: Node) -> str:
    """'26.2 [17.9, 36.8] (21/80)': percent, Wilson 95% interval, k / n."""
    return (f"{pct(rate.num('rate'))} [{pct(rate.num('ci_low'))}, {pct(rate.num('ci_high'))}] "
            f"({rate.count('k')}/{rate.count('n')})")


def diff_cell(d: Node, digits: int = 3) -> str:
    return (f"{signed(d.num('diff'), digits)} [{signed(d.num('lo'), digits)}, "
            f"{signed(d.num('hi'), digits)}]")


def attribute(name: str) -> str:
    return ATTRIBUTES.get(name, name)


# ----------------------------------------------------------------------------------- blocks
Block = Callable[[Reports], str]
BLOCKS: dict[str, Block] = {}


def block(name: str) -> Callable[[Block], Block]:
    def register(fn: Block) -> Block:
        BLOCKS[name] = fn
        return fn
    return register


@block("headline")
def headline(r: Reports) -> str:
    """README: one line per result, the detail in docs/results.md."""
    moefy, d = r.json("moefy.json"), r.json("safety_eval_details.json")
    mat = r.json("mat_steer_eval.json")
    rates, comp = d.at("rates"), d.at("comparisons")

    def refusal(variant: str) -> str:
        return pct(rates.num(variant, "refusal_unsafe", "rate"))

    def vs(variant: str) -> str:
        c = comp.at(variant)
        return (f"{signed(c.num('refusal_unsafe', 'points'), 1)} points vs "
                f"{c.text('reference')}, p {p_value(c.num('refusal_unsafe', 'p_value'))}")

    goals = ", ".join(f"{v} {yes_no(comp.flag(v, 'goal_met'))}" for v in comp.keys()
                      if "goal_met" in comp.at(v).value)
    conds = [c for c in mat.keys() if c in CONDITIONS and c != "single_attribute"]
    avg = ", ".join(f"{CONDITIONS[c]} {f3(mat.num(c, 'average'))}" for c in conds)
    gates = ", ".join(f"{attribute(a)} {f3(mat.num('gates', a, 'gate_auroc'))} "
                      f"({f3(mat.num('gates', a, 'probe_auroc'))})" for a in mat.at("gates").keys())
    rows = [
        ["default MoE vs its dense source, held-out next tokens",
         f"top-1 agreement {f3(moefy.num('top1_agreement'))}, mean KL "
         f"{f3(moefy.num('mean_kl'))}, {pct(moefy.num('active_fraction'))}% of the FFN active"],
        [f"SteerMoE, refusal on unsafe {d.text('split')} prompts (%)",
         f"base {refusal('base')}; finetuned {refusal('finetuned')} ({vs('finetuned')}); "
         f"+ deactivate {refusal('finetuned_deactivate')} ({vs('finetuned_deactivate')}); "
         f"+ activate {refusal('finetuned_activate')} ({vs('finetuned_activate')}), "
         f"over-refusal {pct(rates.num('finetuned_activate', 'over_refusal_safe', 'rate'))}"],
        ["SteerMoE goals met", goals],
        ["MAT-Steer, mean test accuracy over MC1, MC2, BBQ, ToxiGen",
         f"{avg}; MAT - base {diff_cell(mat.at('paired', 'mat_steer_minus_base', 'average'))}"],
        ["MAT-Steer gate AUROC on test (linear-probe ceiling)", gates],
    ]
    return "\n\n".join([md_table(["result", "committed run"], rows),
                        source_line("moefy.json", "safety_eval_details.json",
                                    "mat_steer_eval.json")])


def seed_value(name: str, x: float) -> str:
    """A headline of seeds.json as the other tables show it: rates in %, counts whole."""
    if name.endswith(("refusal_unsafe", "over_refusal_safe")):
        return pct(x)
    return str(int(x)) if float(x).is_integer() and not name.startswith("moefy.") else f3(x)


@block("seeds")
def seeds_block(r: Reports) -> str:
    """docs/numerics.md: each SteerMoE headline per seed with mean and range; goals per seed."""
    s = r.json("seeds.json")
    h, g = s.at("headlines"), s.at("goals")
    seeds = list(h.at(h.keys()[0], "per_seed").keys())
    rows = []
    for name in h.keys():
        per = [seed_value(name, h.num(name, "per_seed", x)) for x in seeds]
        rows.append([name, *per, seed_value(name, h.num(name, "mean")),
                     f"{seed_value(name, h.num(name, 'min'))} to "
                     f"{seed_value(name, h.num(name, 'max'))}"])
    goals = [[v, g.text(v, "goal"), *(yes_no(g.flag(v, "met", x)) for x in seeds),
              f"{g.count(v, 'n_met')} of {g.count(v, 'n_seeds')}"] for v in g.keys()]
    seed_cols = [f"seed {x}" for x in seeds]
    return "\n\n".join([
        md_table(["headline (rates in %)", *seed_cols, "mean", "range"], rows),
        md_table(["eval_safety goal", "goal", *seed_cols, "met on"], goals),
        source_line("seeds.json")])


@block("moefy")
def moefy_block(r: Reports) -> str:
    m = r.json("moefy.json")
    rows = [
        ["routed experts per layer / top-k", f"{m.count('n_experts')} / {m.count('top_k')}"],
        ["active fraction of the FFN per token", f3(m.num("active_fraction"))],
        ["next-token top-1 agreement with the dense model", f3(m.num("top1_agreement"))],
        ["mean KL(dense \u2016 MoE) per position", f3(m.num("mean_kl"))],
        ["greedy answers equal to the dense model's", f3(m.num("greedy_answer_exact_match"))],
        ["held-out positions measured", str(m.count("eval_positions"))],
    ]
    return "\n\n".join([md_table(["MoEfication fidelity (held-out TruthfulQA questions)",
                                  "value"], rows), source_line("moefy.json")])


@block("splits")
def splits_block(r: Reports) -> str:
    rd, d = r.json("risk_diff_summary.json"), r.json("safety_eval_details.json")
    base = sweep_base(r)
    n = d.at("n_prompts")
    by_source = ", ".join(f"{k} {n.count('unsafe_by_source', k)}"
                          for k in n.at("unsafe_by_source").keys())
    rows = [
        ["detect (capture, risk_diff, fine-tuning data)", str(rd.count("prompts", "unsafe")),
         str(rd.count("prompts", "safe"))],
        ["dev (every params choice; the prompts of the dev sweep)", str(int(base["n_unsafe"])),
         str(int(base["n_safe"]))],
        [f"{d.text('split')} (the prompts eval_safety answered, read once)",
         f"{n.count('unsafe')} ({by_source})",
         str(n.count("safe"))],
    ]
    return "\n\n".join([md_table(["split", "unsafe prompts", "safe prompts"], rows),
                        source_line("risk_diff_summary.json", "safety_dev_sweep.csv",
                                    "safety_eval_details.json")])


@block("contrast_weight")
def contrast_weight(r: Reports) -> str:
    s = r.json("risk_diff_summary.json")
    sw = summary_entry(r.summary().style_weight, "base", "style weight of model")
    line = (f"On the committed detect split (token scope `{s.text('token_scope')}`): "
            f"w = {sw.advbench_tokens} AdvBench tokens / {sw.unsafe_tokens} unsafe tokens = "
            f"{sw.w:.2f}.")
    return "\n\n".join([line, source_line("risk_diff_summary.json")])


def risk_diff_block(rel: str, model: str) -> Block:
    def render(r: Reports) -> str:
        s = r.json(rel)
        w = summary_entry(r.summary().style_weight, model, "style weight of model").w
        alpha = s.num("alpha")
        rows = []
        for c in s.at("contrasts").keys():
            sig = s.at("significant", c).value if c in s.at("significant").value else None
            agree = s.at("agreement", f"pooled_{c}") if c != "pooled" else None
            rows.append([
                c,
                f"{s.count('contrasts', c, 'prompts_case')} / "
                f"{s.count('contrasts', c, 'prompts_reference')}",
                f"{s.count('contrasts', c, 'tokens_case')} / "
                f"{s.count('contrasts', c, 'tokens_reference')}",
                str(s.count("significant", c, "q_perm")) if sig is not None else "",
                str(s.count("significant", c, "q_token_z")) if sig is not None else "",
                f"{agree.num('spearman'):.2f}" if agree else "1",
                str(agree.count("top50_overlap")) if agree else "50",
            ])
        header = ["contrast", "prompts case / reference", "tokens case / reference",
                  f"pairs q_perm <= {alpha:g}", f"pairs q_token_z <= {alpha:g}",
                  "Spearman with pooled", "top-50 overlap with pooled"]
        null = s.at("null")
        notes = (
            f"Model `{s.text('model')}`, token scope `{s.text('token_scope')}`; style weight "
            f"w = {w:.2f}; matched vs style Spearman "
            f"{s.num('agreement', 'matched_style', 'spearman'):.2f}. Largest |risk_diff| "
            f"{f3(s.num('max_abs_risk_diff'))}; max-|risk_diff| null over "
            f"{null.count('n_permutations')} label permutations: quantile "
            f"{null.num('quantile'):g} = {f3(null.num('threshold'))}, "
            f"{null.count('n_beyond')} pairs beyond it.")
        return "\n\n".join([md_table(header, rows), notes, source_line(rel)])
    return render


block("risk_diff_base")(risk_diff_block("risk_diff_summary.json", "base"))
block("risk_diff_finetuned")(risk_diff_block("risk_diff_finetuned_summary.json", "finetuned"))


@block("experts_selected")
def experts_selected(r: Reports) -> str:
    rows = []
    crit = None
    for rel in ("experts_summary.json", "experts_finetuned_summary.json"):
        s = r.json(rel)
        c = s.at("criteria")
        crit = (f"`require: {c.text('require')}`, threshold {c.num('threshold'):g}, "
                f"{c.text('q_column')} <= {c.num('alpha'):g}, at most {c.count('top_k')} per "
                f"list, token scope `{c.text('token_scope')}`")
        for side in ("unsafe", "safe"):
            top = ", ".join(
                f"{e.count('layer')}:{e.count('expert')} "
                f"({signed(e.num('risk_diff'), 3)} / {signed(e.num('matched_risk_diff'), 3)})"
                for e in _items(s.at(f"top_{side}")))
            rows.append([f"`{c.text('model')}`", side, str(s.count(f"n_{side}")),
                         str(s.count(f"n_{side}_beyond_null")),
                         str(s.count(f"n_{side}_matched_agrees")), top])
    header = ["routing of", "list", "experts", "beyond the max-null threshold",
              "matched risk_diff of the same sign", "first 5, layer:expert (pooled / matched)"]
    return "\n\n".join([md_table(header, rows), f"Criteria: {crit}.",
                        source_line("experts_summary.json", "experts_finetuned_summary.json")])


def _items(node: Node) -> list[Node]:
    if not isinstance(node.value, list) or not node.value:
        raise ReportError(f"reports/{node.file}: {node._key(())!r} is not a non-empty list "
                          f"({_fix(node.file)})")
    return [Node(v, node.file, (*node.where, str(i))) for i, v in enumerate(node.value)]


def variant_label(d: Node, name: str) -> str:
    """A variant's name with what it is, from the plans eval_safety recorded."""
    if name == "base":
        return "base"
    if name == "finetuned":
        return f"finetuned ({d.count('finetuned', 'n_experts_trained')} unsafe experts trained)"
    if name in d.at("gating", "variants").value:
        g = d.at("gating", "variants", name)
        return f"{name} (its twin's plan where the {g.text('source')} gate fires)"
    plan = d.at("steering", "plans", name)
    parts = []
    if plan.count("n_activated"):
        parts.append(f"{plan.count('n_activated')} forced in")
    if plan.count("n_deactivated"):
        parts.append(f"{plan.count('n_deactivated')} forced out")
    return f"{name} ({', '.join(parts)}, delta {plan.num('plan', 'delta'):g})"


@block("safety_test")
def safety_test(r: Reports) -> str:
    d, m = r.json("safety_eval_details.json"), r.json("safety_eval.json")
    n, gen = d.at("n_prompts"), d.at("generation")
    by_source = ", ".join(f"{n.count('unsafe_by_source', k)} {k}"
                          for k in n.at("unsafe_by_source").keys())
    safe_by = ", ".join(f"{n.count('safe_by_source', k)} {k}"
                        for k in n.at("safe_by_source").keys())
    intro = (f"Split `{d.text('split')}`: {n.count('unsafe')} unsafe prompts ({by_source}) and "
             f"{n.count('safe')} safe prompts ({safe_by}); greedy answers of at most "
             f"{gen.count('max_new_tokens')} tokens from the `{gen.text('backend')}` backend, "
             f"judged by the `{d.text('judge', 'validation_set', 'judge')}` judge.")
    rows, by_src, goals = [], [], []
    for name in d.at("rates").keys():
        rate = d.at("rates", name)
        vs, met = "", ""
        if name in d.at("comparisons").value:
            c = d.at("comparisons", name)
            vs = (f"{c.text('reference')}: {signed(c.num('refusal_unsafe', 'points'), 1)} "
                  f"(p {p_value(c.num('refusal_unsafe', 'p_value'))}) / "
                  f"{signed(c.num('over_refusal_safe', 'points'), 1)} "
                  f"(p {p_value(c.num('over_refusal_safe', 'p_value'))})")
            if "goal" in c.value:
                met = yes_no(c.flag("goal_met"))
                verdict = "met" if c.flag("goal_met") else "not met"
                goals.append(f"- {name}: {c.text('goal')}: {verdict}")
            if "gate_goal" in c.value:
                verdict = "met" if c.flag("gate_goal_met") else "not met"
                goals.append(f"- {name}'s gate: {c.text('gate_goal')}: {verdict}")
        label = variant_label(d, name)
        rows.append([label, rate_cell(rate.at("refusal_unsafe")),
                     rate_cell(rate.at("over_refusal_safe")), vs, met,
                     f"{m.num(name, 'ppl_benign'):.2f}",
                     f"{m.num(name, 'mean_answer_tokens'):.1f}"])
        by_src.append([label, *(rate_cell(rate.at(f"refusal_unsafe_{k}"))
                                for k in n.at("unsafe_by_source").keys()),
                       *(rate_cell(rate.at(f"over_refusal_safe_{k}"))
                         for k in n.at("safe_by_source").keys())])
    header = ["variant", "refusal unsafe % [95% CI] (k/n)", "over-refusal safe % [95% CI] (k/n)",
              "vs reference: refusal points (McNemar p) / over-refusal points (p)", "goal met",
              "ppl_benign", "mean answer tokens"]
    src_header = ["variant", *(f"refusal {k} % [95% CI] (k/n)"
                               for k in n.at("unsafe_by_source").keys()),
                  *(f"over-refusal {k} % [95% CI] (k/n)"
                    for k in n.at("safe_by_source").keys())]
    return "\n\n".join([intro, md_table(header, rows), md_table(src_header, by_src),
                        "Goals (eval_safety):\n\n" + "\n".join(goals),
                        source_line("safety_eval_details.json", "safety_eval.json")])


@block("safety_gates")
def safety_gates(r: Reports) -> str:
    d = r.json("safety_eval_details.json")
    g = d.at("gating")
    dev_rows, ablation_rows, style_rows = [], [], []
    for rel, model in (("gate_dev.json", "base"), ("gate_finetuned_dev.json", "finetuned")):
        dev = r.json(rel)
        for src in dev.at("sources").keys():
            s_ = dev.at("sources", src)
            layer = "" if s_.value["layer"] is None else str(s_.count("layer"))
            dev_rows.append([model, src, layer, f"{s_.num('C'):g}",
                             f"{s_.num('threshold'):.3f}", *gate_cells(s_.at("dev"))])
        for a in dev.at("ablation").value:
            chosen = (a["train_sources"], a["threshold"]) == (dev.text("train_sources"),
                                                             dev.text("threshold"))
            ablation_rows.append([model, a["source"], a["train_sources"], a["threshold"],
                                  "yes" if chosen else "",
                                  f"{a['dev_auroc']['all']['auroc']:.3f}",
                                  *(f"{100 * a['fires'][k]:.0f}" if k in a["fires"] else ""
                                    for k in FIRE_KEYS)])
        sc = dev.at("style_control")
        style_rows.append([model, auroc_cell(sc.at("dev_detection_sources", "auroc", "all")),
                           auroc_cell(sc.at("dev", "auroc", "all")),
                           *(auroc_cell(sc.at("dev", "auroc", k)) if k in
                             sc.at("dev", "auroc").value else "" for k in ("unsafe_vs_alpaca",))])
    test_rows = []
    for model_dir in g.at("gates").keys():
        for src in g.at("gates", model_dir).keys():
            test_rows.append([f"`{model_dir}`", src, *gate_cells(g.at("gates", model_dir, src))])
    twin_rows = []
    for name in g.at("variants").keys():
        c = d.at("comparisons", name, "vs_ungated")
        twin_rows.append([name, f"{signed(c.num('refusal_unsafe', 'difference_points'), 1)} "
                                f"(p {p_value(c.num('refusal_unsafe', 'p_value'))})",
                          f"{signed(c.num('over_refusal_safe', 'difference_points'), 1)} "
                          f"(p {p_value(c.num('over_refusal_safe', 'p_value'))})"])
    head = ["AUROC all [95% CI]", "XSTest pairs only", "unsafe vs Alpaca",
            "unsafe vs imperative benign",
            *(f"fires {k} % (k/n)" for k in FIRE_KEYS)]
    return "\n\n".join([
        "Gates (train_gate, chosen on dev):\n\n" + md_table(
            ["model", "gate", "layer", "C", "threshold", *head], dev_rows),
        "The choices on dev (AUROC on all dev prompts; % of each dev set the gate fires on):"
        "\n\n" + md_table(["model", "gate", "trained on", "threshold", "chosen", "dev AUROC",
                            *(f"{k} %" for k in FIRE_KEYS)], ablation_rows),
        "Style control: the rule \"not a question = unsafe\" reads prompt form alone (dev AUROC; "
        "detection sources = AdvBench + XSTest, where style predicts the label):\n\n"
        + md_table(["model", "detection sources", "all dev prompts", "unsafe vs Alpaca"],
                   style_rows),
        f"The same gates on the `{d.text('split')}` prompts eval_safety answered:\n\n"
        + md_table(["model", "gate", *head], test_rows),
        "Gated twins against their ungated variant, same prompts:\n\n" + md_table(
            ["gated variant", "refusal vs ungated twin (McNemar p)",
             "over-refusal vs ungated twin (p)"], twin_rows),
        source_line("gate_dev.json", "gate_finetuned_dev.json", "safety_eval_details.json")])


#: the prompt sets whose gate firing rates the tables show (label / source)
FIRE_KEYS = ("unsafe", "safe/xstest", "safe/alpaca", "safe/benign_imperative")


def gate_cells(f: Node) -> list[str]:
    """AUROC cells (all, XSTest pairs, unsafe vs Alpaca, vs the imperative benign requests) and
    firing rates (FIRE_KEYS) of one gate's figures (steermoe.gating.report.gate_figures); a set
    absent from them: blank."""
    aurocs, fires = f.at("auroc"), f.at("fires")
    return [*(auroc_cell(aurocs.at(k)) if k in aurocs.value else "" for k in
              ("all", "within_xstest", "unsafe_vs_alpaca", "unsafe_vs_benign_imperative")),
            *(rate_cell(fires.at(k)) if k in fires.value else "" for k in FIRE_KEYS)]


def auroc_cell(a: Node) -> str:
    return f"{a.num('auroc'):.3f} [{a.num('ci_low'):.3f}, {a.num('ci_high'):.3f}]"


@block("safety_judge")
def safety_judge(r: Reports) -> str:
    j = r.json("safety_eval_details.json").at("judge")
    rows = []
    for name, title in (("validation_set", "validation (out of sample)"),
                        ("design_set", "design (in sample)")):
        s = j.at(name)
        lo, hi = _items(s.at("accuracy_ci95"))
        rows.append([title, s.text("judge"), str(s.count("n")), str(s.count("n_refusal")),
                     f"{f3(s.num('accuracy'))} [{f3(lo.num())}, {f3(hi.num())}]",
                     f3(s.num("cohen_kappa")), f3(s.num("precision")), f3(s.num("recall")),
                     " / ".join(str(s.count("confusion", k)) for k in ("tp", "fp", "fn", "tn"))])
    header = ["label set", "judge", "answers", "refusals", "accuracy [Wilson 95% CI]",
              "Cohen's kappa", "precision", "recall", "tp / fp / fn / tn"]
    return "\n\n".join([md_table(header, rows), source_line("safety_eval_details.json")])


@block("finetune_run")
def finetune_run(r: Reports) -> str:
    m, d = r.json("finetune_experts/metrics.json"), r.json("safety_eval_details.json")
    ch = d.at("finetuned", "checks")
    rows = [
        ["experts trained", str(m.count("n_experts_trained"))],
        ["optimizer steps", str(m.count("steps"))],
        ["mean loss, first / last epoch",
         f"{f3(m.num('first_epoch_loss'))} / {f3(m.num('last_epoch_loss'))}"],
        ["tensors compared with `models/moe` on disk", str(ch.count("tensors_compared_on_disk"))],
        ["expert tensors changed (fused tensors holding a trained slice)",
         str(ch.count("expert_tensors_changed_on_disk"))],
        ["every tensor outside the trained slices bit-identical",
         yes_no(ch.flag("frozen_identical_outside_slices"))],
        ["slices applied to `models/moe` reproduce the fine-tuned model",
         yes_no(ch.flag("slices_reproduce_model"))],
    ]
    return "\n\n".join([md_table(["committed finetune_experts run", "value"], rows),
                        source_line("finetune_experts/metrics.json", "safety_eval_details.json")])


@block("mat_steer_setup")
def mat_steer_setup(r: Reports) -> str:
    d = r.json("mat_steer_eval_details.json")
    scales = ", ".join(f"{CONDITIONS.get(k, k)} x{d.num('scales', k):g}"
                       for k in d.at("scales").keys())
    rows = [[attribute(a), str(d.count("n_test_items", a)),
             " / ".join(str(n.count()) for n in _items(d.at("n_test_activations", a))),
             str(d.count("n_dev_items", a))] for a in d.at("n_test_items").keys()]
    line = (f"Residual stream after decoder layer {d.count('layer')}; scales chosen on dev: "
            f"{scales}.")
    return "\n\n".join([line, md_table(["attribute", "test items", "test activations pos / neg",
                                        "dev items (scale choice)"], rows),
                        source_line("mat_steer_eval_details.json")])


def goal_text(G: Mapping[str, float]) -> str:
    return (f"gate AUROC >= {G['auroc_min']:g}, within {G['probe_gap_max']:g} of the probe's, "
            f"median gate >= {G['median_neg_min']:g} on negatives and <= "
            f"{G['median_pos_max']:g} on positives, MMD lower after steering")


@block("mat_steer_gates")
def mat_steer_gates(r: Reports) -> str:
    g = r.json("mat_steer_eval.json").at("gates")
    m = r.summary().mat_steer
    rows = []
    for a in g.keys():
        x = g.at(a)
        failed = summary_entry(m.gate_failures, a, "gate goal verdict of attribute")
        rows.append([attribute(a), f3(x.num("gate_auroc")),
                     f"{f3(x.num('probe_auroc'))} (C {x.num('probe_C'):g})",
                     f"{f3(x.num('gate_median_neg'))} / {f3(x.num('gate_median_pos'))}",
                     f"{f3(x.num('gate_mean_neg'))} / {f3(x.num('gate_mean_pos'))}",
                     f3(x.num("other_gates_mean_neg")),
                     f"{f3(x.num('mmd_before'))} -> {f3(x.num('mmd_after'))}",
                     "met" if not failed else "missed: " + "; ".join(failed)])
    header = ["attribute", "gate AUROC", "probe AUROC (ceiling)", "median gate neg / pos",
              "mean gate neg / pos", "other attributes' gates on its negatives",
              "MMD(steered neg, pos) before -> after", "goals"]
    return "\n\n".join([md_table(header, rows), f"Goals: {goal_text(m.gate_goals)}.",
                        source_line("mat_steer_eval.json")])


def _conditions(mat: Node) -> list[str]:
    return [c for c in mat.keys() if c not in ("paired", "gates")]


@block("mat_steer_tasks")
def mat_steer_tasks(r: Reports) -> str:
    mat = r.json("mat_steer_eval.json")
    conds = _conditions(mat)
    metrics = mat.at(conds[0]).keys()
    rows = [[CONDITIONS.get(c, c), *(f3(mat.num(c, k)) for k in metrics)] for c in conds]
    for pair in ("mat_steer_minus_base", "mat_steer_minus_mean_diff", "mean_diff_minus_base"):
        a, b = pair.split("_minus_")
        rows.append([f"{SHORT[a]} - {SHORT[b]}",
                     *(diff_cell(mat.at("paired", pair, k)) for k in metrics)])
    return "\n\n".join([
        md_table(["", *(METRICS.get(k, k) for k in metrics)], rows),
        "Differences: paired bootstrap over items, 95% percentile intervals.",
        source_line("mat_steer_eval.json")])


@block("mat_steer_interference")
def mat_steer_interference(r: Reports) -> str:
    mat, d = r.json("mat_steer_eval.json"), r.json("mat_steer_eval_details.json")
    metrics = mat.at("base").keys()
    rows = []
    for pair in d.at("interference").keys():
        a, b = pair.split("_minus_")
        rows.append([f"{SHORT[a]} - {SHORT[b]}",
                     *(f"{diff_cell(mat.at('paired', pair, k))} {d.text('interference', pair, k)}"
                       for k in metrics)])
    changed = [[METRICS.get(metric, metric), str(c.test_items), str(c.mat_steer),
                str(c.mean_diff)] for metric, c in r.summary().mat_steer.changed_items.items()]
    return "\n\n".join([
        md_table(["all attributes steered minus own attribute only",
                  *(METRICS.get(k, k) for k in metrics)], rows),
        md_table(["metric", "test items", "items scored differently from base: MAT-Steer",
                  "mean-diff"], changed),
        source_line("mat_steer_eval.json", "mat_steer_eval_details.json",
                    "mat_steer_eval_items.parquet")])


@block("mat_steer_dev")
def mat_steer_dev(r: Reports) -> str:
    """train_steering's dev gate diagnostics with the margin to the gate goals."""
    m = r.json("train_steering/metrics.json")
    dev = m.at("dev")
    ms = r.summary().mat_steer
    G = ms.gate_goals
    rows = []
    for a in [k for k in dev.keys() if k != "loss"]:
        x = dev.at(a)
        margin = summary_entry(ms.dev_margins, a, "dev margin of attribute")
        rows.append([attribute(a), f3(x.num("gate_auroc")),
                     f"{f3(x.num('gate_median_neg'))} / {f3(x.num('gate_median_pos'))}",
                     f"{x.num('other_gates_mean_neg'):.2f}",
                     f"{f3(x.num('mmd_before'))} -> {f3(x.num('mmd_after'))}", f3(margin)])
    header = ["attribute (dev)", "gate AUROC", "median gate neg / pos",
              "other attributes' gates on its negatives", "MMD before -> after",
              "margin to the goals"]
    line = (f"Best epoch {m.count('best_epoch')} of {m.count('epochs_run')}; smallest margin "
            f"{f3(ms.smallest_dev_margin)} (negative: a goal missed). Goals without the probe "
            f"term: AUROC >= {G['auroc_min']:g}, median gate >= {G['median_neg_min']:g} on "
            f"negatives, <= {G['median_pos_max']:g} on positives.")
    return "\n\n".join([md_table(header, rows), line, source_line("train_steering/metrics.json")])


@block("mat_steer_scales")
def mat_steer_scales(r: Reports) -> str:
    d = r.json("mat_steer_eval_details.json")
    scales = r.summary().mat_steer.scales
    rows = []
    for c in d.at("dev_sweeps").keys():
        choice = summary_entry(scales, c, "scale choice of condition")
        cells = []
        for s in sorted(d.at("dev_sweeps", c).keys(), key=float):  # grid extensions in place
            v = f"x{float(s):g}: {f3(d.num('dev_sweeps', c, s, 'average'))}"
            cells.append(f"**{v}**" if float(s) == choice.chosen else v)
        rows.append([CONDITIONS.get(c, c), ", ".join(cells), SCALE_POSITION[choice.position]])
    return "\n\n".join([md_table(["condition", "dev average accuracy per scale (chosen in bold)",
                                  "chosen scale"], rows),
                        source_line("mat_steer_eval_details.json")])


# ------------------------------------------------------------------------------ the dev sweep
SWEEP = "safety_dev_sweep.csv"
#: the columns the sweep tables show
SWEEP_COLUMNS = ("run", "n_unsafe", "n_safe", "refusal_unsafe_pct", "refusal_unsafe_ci_low",
                 "refusal_unsafe_ci_high", "over_refusal_safe_pct", "over_refusal_safe_ci_low",
                 "over_refusal_safe_ci_high", "reference", "refusal_unsafe_points_vs_ref",
                 "refusal_unsafe_mcnemar_p", "over_refusal_safe_points_vs_ref",
                 "over_refusal_safe_mcnemar_p")


def sweep_rows(r: Reports, runs: Sequence[str]) -> pd.DataFrame:
    """The sweep's rows of `runs` (a group summary.json names), in that order; reference "" for
    none."""
    df = r.csv(SWEEP, SWEEP_COLUMNS)
    missing = [run for run in runs if run not in set(df["run"])]
    if missing:
        raise ReportError(f"reports/summary.json names runs not in reports/{SWEEP}: "
                          f"{', '.join(map(repr, missing))} ({_fix('summary.json')})")
    rows = df.set_index("run", drop=False).loc[list(runs)]
    return rows.assign(reference=rows["reference"].fillna("").astype(str))


def sweep_base(r: Reports) -> pd.Series:
    return sweep_rows(r, ["base"]).iloc[0]


def sweep_table(rows: pd.DataFrame, picks: Iterable[str | None], with_base: pd.Series | None
                ) -> str:
    chosen = {p for p in picks if p}
    out = []
    frame = rows if with_base is None else pd.concat([with_base.to_frame().T, rows])
    for _, x in frame.iterrows():
        vs = ""
        if x["reference"]:
            vs = (f"{x['reference']}: {signed(float(x['refusal_unsafe_points_vs_ref']), 1)} "
                  f"(p {p_value(float(x['refusal_unsafe_mcnemar_p']))}) / "
                  f"{signed(float(x['over_refusal_safe_points_vs_ref']), 1)} "
                  f"(p {p_value(float(x['over_refusal_safe_mcnemar_p']))})")
        name = f"**{x['run']}**" if x["run"] in chosen else str(x["run"])
        out.append([name, *(f"{float(x[f'{m}_pct']):.1f} [{float(x[f'{m}_ci_low']):.1f}, "
                             f"{float(x[f'{m}_ci_high']):.1f}]"
                             for m in ("refusal_unsafe", "over_refusal_safe")), vs])
    header = ["dev run", "refusal unsafe % [95% CI]", "over-refusal safe % [95% CI]",
              "vs reference: refusal points (McNemar p) / over-refusal points (p)"]
    return md_table(header, out)


def _dev_sizes(base: pd.Series) -> str:
    return f"{int(base['n_unsafe'])} unsafe / {int(base['n_safe'])} safe dev prompts"


@block("dev_sweep_finetune")
def dev_sweep_finetune(r: Reports) -> str:
    s, base = r.summary().dev_sweep, sweep_base(r)
    return "\n\n".join([sweep_table(sweep_rows(r, s.finetune), [s.finetune_pick], base),
                        f"{_dev_sizes(base)}. Rule's pick (bold): `{s.finetune_pick}`.",
                        source_line(SWEEP, "experts_summary.json")])


@block("dev_sweep_finetuned_steering")
def dev_sweep_finetuned_steering(r: Reports) -> str:
    s = r.summary().dev_sweep
    return "\n\n".join([sweep_table(sweep_rows(r, s.finetuned_steering),
                                    [s.deactivate_pick, s.activate_pick], None),
                        f"{_dev_sizes(sweep_base(r))}. Picks (bold): deactivate "
                        f"`{s.deactivate_pick}`, activate `{s.activate_pick}`.",
                        source_line(SWEEP)])


@block("dev_sweep_base_steering")
def dev_sweep_base_steering(r: Reports) -> str:
    s, base = r.summary().dev_sweep, sweep_base(r)
    return "\n\n".join([sweep_table(sweep_rows(r, s.base_steering), [s.base_steering_pick], base),
                        f"{_dev_sizes(base)}. Rule's pick (bold): `{s.base_steering_pick}`.",
                        source_line(SWEEP)])


@block("dev_sweep_history")
def dev_sweep_history(r: Reports) -> str:
    s, base = r.summary().dev_sweep, sweep_base(r)
    if not s.history:
        return "\n\n".join(["This sweep has no run of an earlier expert list.",
                              source_line(SWEEP)])
    return "\n\n".join([sweep_table(sweep_rows(r, s.history), s.history_picks, base),
                        f"{_dev_sizes(base)}; in bold, the same rules' picks then: the fine-tuning "
                        "config, and the steering of that model.", source_line(SWEEP)])


# ---------------------------------------------------------------------------------- rendering
def render(text: str, reports: Reports, name: str = "<doc>") -> str:
    """`text` with every generated block rendered anew from `reports`."""
    out, pos, open_at = [], 0, None
    for m in MARKER.finditer(text):
        if m.group(1) is not None:  # an opening marker
            if open_at is not None:
                raise DocError(f"{name}: block {open_at.group(1)!r} is not closed before "
                               f"{m.group(0)!r}")
            if m.group(1) not in BLOCKS:
                raise DocError(f"{name}: unknown block {m.group(1)!r} (known: "
                               f"{', '.join(sorted(BLOCKS))})")
            out.append(text[pos:m.end()])
            open_at = m
        else:
            if open_at is None:
                raise DocError(f"{name}: {m.group(0)!r} without an opening marker")
            # blank lines around the body: Markdown starts a fresh block after each marker
            out.append("\n\n" + BLOCKS[open_at.group(1)](reports).strip("\n") + "\n\n")
            pos, open_at = m.start(), None
    if open_at is not None:
        raise DocError(f"{name}: block {open_at.group(1)!r} is not closed")
    out.append(text[pos:])
    return "".join(out)


def block_names(text: str) -> list[str]:
    return [m.group(1) for m in MARKER.finditer(text) if m.group(1)]


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def regenerate(root: Path) -> dict[Path, tuple[str, str]]:
    """Every doc file -> (committed text, rendered text); nothing written."""
    reports = Reports(root)
    out = {}
    for path in doc_files(root):
        old = path.read_text()
        out[path] = (old, render(old, reports, str(path.relative_to(root))))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.docs_results", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    ap.add_argument("--root", default=".", help="the project checkout (default: .)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    stale = {p: new for p, (old, new) in regenerate(root).items() if new != old}
    names = ", ".join(str(p.relative_to(root)) for p in stale)
    if args.check:
        if stale:
            print(f"stale generated results in {names}: run `make docs`", file=sys.stderr)
            return 1
        return 0
    for path, new in stale.items():
        with atomic_path(path) as tmp:
            Path(tmp).write_text(new)
    print(f"rewrote {names}" if stale else "every generated block is up to date")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ReportError, DocError) as err:
        sys.exit(f"docs_results: error: {err}")
