"""Stage train_gate: the prompt gates of one model (one per prompt_gate source), fit on the
detect split's prompts, chosen on dev. One stage definition serves the base and the fine-tuned
model (dvc.yaml's foreach): a gate reads the prefill of the model it gates.

Outputs: the gate folder (<source>.safetensors + <source>.json each, steermoe/gating) and a
report: per source its dev AUROC with a 95% interval, on XSTest's look-alike pairs alone, the
threshold's dev TPR / FPR and the C / layer sweep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerline.core.io import staged_outputs, write_json
from steerline.core.params import Params
from steerline.model.load import load_moe
from steerline.steermoe.data.safety import read_safety_prompts
from steerline.steermoe.gating.features import prompt_features
from steerline.steermoe.gating.prompt_gate import auroc_ci, fit_gate

log = logging.getLogger("train_gate")


@dataclass(frozen=True)
class Inputs:
    prompts: Path  # data/prompts/safety.parquet (detect = fit, dev = choices)
    model: str  # the MoE whose prompts are gated


@dataclass(frozen=True)
class Outputs:
    gate: Path  # folder: <source>.safetensors + <source>.json
    report: Path  # JSON


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    p = params.prompt_gate
    torch.manual_seed(params.seed)
    prompts = read_safety_prompts(inputs.prompts)
    model, tokenizer = load_moe(inputs.model, p.dtype)
    split: dict[str, Any] = {}
    for name in ("detect", "dev"):
        rows = prompts[prompts["split"] == name].reset_index(drop=True)
        if rows["label"].nunique() < 2:
            raise ValueError(f"{inputs.prompts}: the {name} split needs safe and unsafe prompts "
                             "to fit a gate: check prepare_safety's sources and split")
        feats = prompt_features(model, tokenizer, rows["text"].tolist(), p.layers, p.batch_size,
                                desc=f"gate features ({name})")
        split[name] = (rows, feats, (rows["label"] == "unsafe").to_numpy().astype(int))
    del model
    (_, train, train_y), (dev_rows, dev, dev_y) = split["detect"], split["dev"]
    xstest = (dev_rows["source"] == "xstest").to_numpy()
    report: dict[str, Any] = {"model": inputs.model,
                              "n_prompts": {name: {"unsafe": int(y.sum()),
                                                   "safe": int(len(y) - y.sum())}
                                            for name, (_, _, y) in split.items()},
                              "sources": {}}
    gates = []
    for source in p.sources:
        gate, sweep = fit_gate(source, train, train_y, dev, dev_y, p.layers, p.cs, params.seed)
        scores = gate.scores(dev)
        report["sources"][source] = {
            "layer": gate.layer, "C": gate.info["C"], "threshold": round(gate.threshold, 6),
            "dev": auroc_ci(scores, dev_y, p.n_bootstrap, params.seed),
            "dev_xstest_pairs": auroc_ci(scores[xstest], dev_y[xstest], p.n_bootstrap,
                                         params.seed),
            "dev_tpr": gate.info["dev_tpr"], "dev_fpr": gate.info["dev_fpr"],
            "sweep": sweep,
        }
        gates.append(gate)
        log.info("%s gate (layer %s, C %g): dev AUROC %.3f, fires on %.0f%% of unsafe / %.0f%% of "
                 "safe dev prompts", source, gate.layer, gate.info["C"], gate.info["dev_auroc"],
                 100 * gate.info["dev_tpr"], 100 * gate.info["dev_fpr"])
    best = max(report["sources"], key=lambda s: report["sources"][s]["dev"]["auroc"])
    report["best_source_by_dev_auroc"] = best
    with staged_outputs() as staged:
        folder = staged.dir(out.gate)
        for gate in gates:
            gate.save(folder)
        write_json(report, staged(out.report))
