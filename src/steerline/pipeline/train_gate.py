"""Stage train_gate: the prompt gates of one model (one per prompt_gate source), fit on the
detect split's prompts, chosen on dev. One stage definition serves the base and the fine-tuned
model (dvc.yaml's foreach): a gate reads the prefill of the model it gates.

Outputs: the gate folder (<source>.safetensors + <source>.json each, steermoe/gating) and a
report, all on dev: per gate source its AUROC on every contrast (gating.report: all prompts,
XSTest's look-alike pairs alone, unsafe vs each safe source) with 95% intervals, how often it
fires per source, the C / layer sweep; the ablation of the choices (training sources x
threshold rule), and the style control: "no question mark = unsafe", a rule that reads prompt
form alone, scored on the same dev prompts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerline.core.io import staged_outputs, write_json
from steerline.core.params import Params
from steerline.model.arch import decoder_layers
from steerline.model.load import load_moe
from steerline.steermoe.data.safety import read_safety_prompts
from steerline.steermoe.gating.features import probe_layers, prompt_features
from steerline.steermoe.gating.prompt_gate import (
    PromptGate,
    budget_threshold,
    fit_gate,
    youden_threshold,
)
from steerline.steermoe.gating.report import gate_figures

log = logging.getLogger("train_gate")


@dataclass(frozen=True)
class Inputs:
    prompts: Path  # data/prompts/safety.parquet (detect = fit, dev = choices)
    model: str  # the MoE whose prompts are gated


@dataclass(frozen=True)
class Outputs:
    gate: Path  # folder: <source>.safetensors + <source>.json
    report: Path  # JSON


def style_rule(texts: list[str]) -> np.ndarray:
    """1.0 where a prompt is not a question (no closing '?'): AdvBench's imperative form [N]."""
    return np.array([0.0 if t.rstrip().endswith("?") else 1.0 for t in texts])


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    p = params.prompt_gate
    torch.manual_seed(params.seed)
    prompts = read_safety_prompts(inputs.prompts)
    rows = {name: prompts[prompts["split"] == name].reset_index(drop=True)
            for name in ("detect", "dev")}
    for name, r in rows.items():
        if r["label"].nunique() < 2:
            raise ValueError(f"{inputs.prompts}: the {name} split needs safe and unsafe prompts "
                             "to fit a gate: check prepare_safety's sources and split")
    model, tokenizer = load_moe(inputs.model, p.dtype)
    layers = probe_layers(p.depths, len(decoder_layers(model)))
    feats = {name: prompt_features(model, tokenizer, r["text"].tolist(), layers, p.batch_size,
                                   desc=f"gate features ({name})") for name, r in rows.items()}
    del model
    dev_rows, dev = rows["dev"], feats["dev"]
    dev_y = (dev_rows["label"] == "unsafe").to_numpy().astype(int)
    labels, sources = dev_rows["label"].to_numpy(), dev_rows["source"].to_numpy()

    def fit(source: str, train_sources: str, threshold: str
            ) -> tuple[PromptGate, list[dict[str, Any]]]:
        keep = (np.ones(len(rows["detect"]), bool) if train_sources == "all"
                else rows["detect"]["detection"].to_numpy(bool))
        train = {k: v[keep] for k, v in feats["detect"].items()}
        train_y = (rows["detect"]["label"][keep] == "unsafe").to_numpy().astype(int)
        if len(set(train_y)) < 2:
            raise ValueError(f"{inputs.prompts}: the detect split of the gate's training sources "
                             f"({train_sources}) needs safe and unsafe prompts: check "
                             "prepare_safety's sources or prompt_gate.train_sources")
        return fit_gate(source, train, train_y, dev, dev_y, layers, p.cs, params.seed,
                        p.max_dev_fpr if threshold == "fpr_budget" else None, sources)

    def figures(gate: PromptGate) -> dict[str, Any]:
        return gate_figures(gate.scores(dev), gate.fires(dev), labels, sources, p.n_bootstrap,
                            params.seed)

    report: dict[str, Any] = {
        "model": inputs.model, "train_sources": p.train_sources, "threshold": p.threshold,
        "max_dev_fpr": p.max_dev_fpr,
        "n_prompts": {name: r.groupby(["label", "source"]).size().unstack(0, fill_value=0)
                      .astype(int).to_dict() for name, r in rows.items()},
        "sources": {}, "ablation": [],
    }
    gates = []
    for source in p.sources:
        gate, sweep = fit(source, p.train_sources, p.threshold)
        report["sources"][source] = {"layer": gate.layer, "C": gate.info["C"],
                                     "threshold": round(gate.threshold, 6),
                                     "dev": figures(gate), "sweep": sweep}
        gates.append(gate)
        fired = report["sources"][source]["dev"]["fires"]
        log.info("%s gate (layer %s, C %g): dev AUROC %.3f, fires on %s", source, gate.layer,
                 gate.info["C"], gate.info["dev_auroc"],
                 ", ".join(f"{k} {100 * v['rate']:.0f}%" for k, v in fired.items()))
        for train_sources in ("all", "detection"):  # the choices, each on the same dev prompts
            fitted = gate if train_sources == p.train_sources else fit(source, train_sources,
                                                                        p.threshold)[0]
            scores = fitted.scores(dev)
            for threshold in ("fpr_budget", "youden"):  # the same fit, the other cut
                cut = (budget_threshold(scores, dev_y, sources, p.max_dev_fpr)
                       if threshold == "fpr_budget" else youden_threshold(scores, dev_y))
                g = replace(fitted, threshold=cut)
                chosen = (train_sources, threshold) == (p.train_sources, p.threshold)
                fig = report["sources"][source]["dev"] if chosen else figures(g)
                report["ablation"].append({
                    "source": source, "train_sources": train_sources, "threshold": threshold,
                    "layer": g.layer, "C": g.info["C"], "dev_auroc": fig["auroc"],
                    "fires": {k: round(v["rate"], 4) for k, v in fig["fires"].items()}})
    style = style_rule(dev_rows["text"].tolist())
    report["style_control"] = {
        "rule": "not a question (no closing '?') = unsafe",
        "dev": gate_figures(style, style >= 0.5, labels, sources, p.n_bootstrap, params.seed),
        "dev_detection_sources": gate_figures(
            *(a[dev_rows["detection"].to_numpy(bool)] for a in (style, style >= 0.5, labels,
                                                                sources)),
            p.n_bootstrap, params.seed)}
    report["best_source_by_dev_auroc"] = max(
        report["sources"], key=lambda s: report["sources"][s]["dev"]["auroc"]["all"]["auroc"])
    with staged_outputs() as staged:
        folder = staged.dir(out.gate)
        for gate in gates:
            gate.save(folder)
        write_json(report, staged(out.report))
