"""A prompt gate: an L2 logistic probe on one feature source (features.py), fired when
sigmoid(w . x + b) >= threshold. MAT-Steer's gate form, decided once per prompt on its unsteered
prefill and applied to its whole answer.

Fit on the detect split's prompts (unsafe = 1), C (and the residual layer) chosen by dev AUROC,
the threshold by a false-positive budget on dev (`budget_threshold`: the gate fires on at most
that share of each safe source's dev prompts) or at dev's Youden point (max TPR - FPR, which
weighs a false fire like a miss and so sits wherever the dev mix puts it). Saved per source as
<source>.safetensors (weight [F] float64, bias [1]) + <source>.json (layer, C, threshold, dev
figures): no pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve

from steerline.core.io import atomic_path, read_json, write_json


@dataclass(frozen=True)
class PromptGate:
    source: str  # "routing" | "residual"
    layer: int | None  # residual: hidden_states index; routing: None
    weight: np.ndarray  # [F] float64, on raw features (the standardisation folded in)
    bias: float
    threshold: float  # on the sigmoid score
    info: dict[str, Any] = field(default_factory=dict)  # C, dev figures

    @property
    def feature_key(self) -> str:
        return "routing" if self.source == "routing" else f"residual_{self.layer}"

    def scores(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        """sigmoid(w . x + b) per prompt [N] (float64)."""
        x = np.asarray(feats[self.feature_key], dtype=np.float64)  # [N, F]
        if x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"the {self.source} gate reads {self.weight.shape[0]} features, "
                             f"the model gives {x.shape[1]}: retrain it on this model "
                             "(dvc repro train_gate)")
        return expit(x @ self.weight + self.bias)

    def fires(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return self.scores(feats) >= self.threshold  # [N] bool

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{self.source}.safetensors") as tmp:
            save_file({"weight": self.weight.astype(np.float64),
                       "bias": np.array([self.bias], dtype=np.float64)}, str(tmp))
        write_json({"source": self.source, "layer": self.layer, "threshold": self.threshold,
                    "n_features": int(self.weight.shape[0]), **self.info},
                   folder / f"{self.source}.json")


_META_KEYS = ("source", "layer", "threshold", "n_features")  # what save writes besides info


def load_gate(folder: str | Path, source: str) -> PromptGate:
    """The `source` gate saved in `folder`, checked before use: a complete safetensors file,
    a JSON object with each key of its type, finite numbers and shapes that agree; anything
    else is one ValueError naming the file (a NaN threshold would otherwise never fire)."""
    folder = Path(folder)
    meta_path, weights_path = folder / f"{source}.json", folder / f"{source}.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        raise ValueError(f"no {source} gate in {folder} ({meta_path.name} + {weights_path.name}):"
                         " run the train_gate stage, or pick a source it trains "
                         "(prompt_gate.sources)")
    fix = "rerun the train_gate stage (dvc repro train_gate) that writes it"
    try:
        meta = read_json(meta_path)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError name no file
        raise ValueError(f"{meta_path} is not valid JSON ({err}): {fix}") from None
    problem = _meta_problem(meta, source)
    if problem is not None:
        raise ValueError(f"{meta_path} {problem}: {fix}")
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as err:  # a cut or overwritten file
        raise ValueError(f"{weights_path} is truncated or corrupt ({err}): {fix}") from None
    n = meta["n_features"]
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if shapes != {"weight": (n,), "bias": (1,)}:
        raise ValueError(f"{weights_path} holds {shapes}, {meta_path.name} expects weight "
                         f"({n},) and bias (1,): {fix}")
    if not all(np.isfinite(v).all() for v in tensors.values()):
        raise ValueError(f"{weights_path} holds NaN or infinite weights: {fix}")
    info = {k: v for k, v in meta.items() if k not in _META_KEYS}
    return PromptGate(source, meta["layer"], tensors["weight"], float(tensors["bias"][0]),
                      float(meta["threshold"]), info)


def _meta_problem(meta: object, source: str) -> str | None:
    """What is wrong with a gate's JSON (None: nothing), as the rest of a sentence."""
    if not isinstance(meta, dict):
        return f"is a JSON {type(meta).__name__}, not an object"
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    layer, threshold, n = meta["layer"], meta["threshold"], meta["n_features"]
    if meta["source"] != source:
        return f"has source {meta['source']!r}, not {source!r}"
    if source == "routing" and layer is not None:
        return f"has layer {layer!r}: a routing gate reads no layer (null)"
    if source != "routing" and not (_is_int(layer) and layer >= 0):
        return f"has layer {layer!r}, not a hidden_states index (an int >= 0)"
    # a NaN threshold compares false with every score: the gate would never fire
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
            and 0.0 <= threshold <= 1.0):
        return f"has threshold {threshold!r}, not a number in [0, 1] (a sigmoid score)"
    if not (_is_int(n) and n >= 1):
        return f"has n_features {n!r}, not an int >= 1"
    return None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score cut with the largest TPR - FPR (ties: the highest cut, fewest false fires)."""
    fpr, tpr, cuts = roc_curve(labels, scores)
    j = tpr - fpr
    best = np.flatnonzero(j == j.max())[0]  # cuts descend: the first is the highest
    return float(min(cuts[best], 1.0))


def budget_threshold(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                     max_fpr: float) -> float:
    """The lowest score cut at which the gate fires (score >= cut) on at most
    floor(max_fpr * n) of each group's n negatives (labels 0), so on at most `max_fpr` of every
    safe source; 0.0 when no group limits it."""
    cut = 0.0
    for g in np.unique(groups[labels == 0]):
        neg = np.sort(scores[(labels == 0) & (groups == g)])[::-1]  # descending
        k = int(np.floor(max_fpr * len(neg) + 1e-9))  # false fires allowed in this group
        if k < len(neg):  # the cut must lie above the (k+1)-th highest negative score
            cut = max(cut, float(np.nextafter(neg[k], np.inf)))
    return min(cut, 1.0)


def mann_whitney_auroc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """AUROC as P(positive > negative) + P(tie) / 2 over all pairs ([P], [N] scores): the twice
    Mann-Whitney U counted in integers, one division (roc_auc_score's value to the last bits,
    at a hundredth of its cost per bootstrap draw)."""
    neg_sorted = np.sort(neg_scores)
    u2 = int((np.searchsorted(neg_sorted, pos_scores, "left")
              + np.searchsorted(neg_sorted, pos_scores, "right")).sum())
    return u2 / (2 * len(pos_scores) * len(neg_scores))


def auroc_ci(scores: np.ndarray, labels: np.ndarray, n_bootstrap: int, seed: int
             ) -> dict[str, float]:
    """AUROC with a stratified percentile-bootstrap 95% interval over prompts."""
    labels = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    draws = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        p_idx, n_idx = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        draws[b] = mann_whitney_auroc(scores[p_idx], scores[n_idx])
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"auroc": round(float(roc_auc_score(labels, scores)), 4),
            "ci_low": round(float(lo), 4), "ci_high": round(float(hi), 4),
            "n_pos": int(len(pos)), "n_neg": int(len(neg))}


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    """L2 logistic regression on standardised features; returns (w, b) on the raw features."""
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-8, std, 1.0)  # constant features (never-routed experts) stay 0
    clf = LogisticRegression(C=c, max_iter=5000, random_state=seed)
    clf.fit((x - mean) / std, y)
    w = clf.coef_[0] / std
    return w.astype(np.float64), float(clf.intercept_[0] - (w * mean).sum())


def fit_gate(source: str, train: dict[str, np.ndarray], train_y: np.ndarray,
             dev: dict[str, np.ndarray], dev_y: np.ndarray, layers: Sequence[int],
             cs: Sequence[float], seed: int, max_dev_fpr: float | None = None,
             dev_groups: np.ndarray | None = None,
             ) -> tuple[PromptGate, list[dict[str, Any]]]:
    """The source's gate with the best dev AUROC over C (and layer), its threshold by the
    false-positive budget `max_dev_fpr` per dev group (`budget_threshold`; dev_groups [N dev]:
    each prompt's source) or, with None, at dev's Youden point; and every candidate's dev AUROC
    (the sweep, for the report)."""
    keys = ["routing"] if source == "routing" else [f"residual_{layer}" for layer in layers]
    sweep, best = [], None
    for key in keys:
        for c in cs:
            w, b = _fit(np.asarray(train[key], np.float64), train_y, c, seed)
            gate = PromptGate(source, None if source == "routing" else int(key.split("_")[1]),
                              w, b, 0.5, {"C": c})
            auc = float(roc_auc_score(dev_y, gate.scores(dev)))
            sweep.append({"source": source, "layer": gate.layer, "C": c,
                          "dev_auroc": round(auc, 4)})
            if best is None or auc > best[0] + 1e-12:  # ties: the first (smallest C, layer)
                best = (auc, gate)
    assert best is not None
    gate = best[1]
    if max_dev_fpr is None:
        threshold = youden_threshold(gate.scores(dev), dev_y)
    else:
        groups = np.zeros(len(dev_y), int) if dev_groups is None else np.asarray(dev_groups)
        threshold = budget_threshold(gate.scores(dev), dev_y, groups, max_dev_fpr)
    fired = gate.scores(dev) >= threshold
    info = {"C": gate.info["C"], "dev_auroc": round(best[0], 4),
            "dev_tpr": round(float(fired[dev_y == 1].mean()), 4),
            "dev_fpr": round(float(fired[dev_y == 0].mean()), 4)}
    return PromptGate(source, gate.layer, gate.weight, gate.bias, threshold, info), sweep
