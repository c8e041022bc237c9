"""A prompt gate measured on labelled prompts of several sources: its AUROC (unsafe = positive)
on every contrast the sources allow, with 95% intervals, and how often it fires per source and
label, with Wilson 95% intervals. train_gate reports it on dev, eval_safety on the eval split.

The contrasts: `all` (every prompt); `within_<source>` for a source holding both labels (XSTest's
look-alike pairs: unsafe and safe written alike, so style cannot separate them); and
`unsafe_vs_<source>` for each source of safe prompts (every unsafe prompt against that source's:
against Alpaca's instructions or imperative requests, style does not separate them either).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from steerline.core.stats import rate
from steerline.steermoe.gating.prompt_gate import auroc_ci


def contrast_masks(labels: np.ndarray, sources: np.ndarray) -> dict[str, np.ndarray]:
    """Contrast name -> the prompts it compares [N] bool (only contrasts with both labels)."""
    unsafe = labels == "unsafe"
    masks = {"all": np.ones(len(labels), bool)}
    for src in sorted(set(sources)):
        masks[f"within_{src}"] = sources == src
    for src in sorted(set(sources[~unsafe])):
        masks[f"unsafe_vs_{src}"] = unsafe | (sources == src)
    return {k: m for k, m in masks.items() if unsafe[m].any() and not unsafe[m].all()}


def gate_figures(scores: np.ndarray, fires: np.ndarray, labels: np.ndarray, sources: np.ndarray,
                 n_bootstrap: int, seed: int) -> dict[str, Any]:
    """{"auroc": contrast -> auroc_ci, "fires": "<label>/<source>" and "<label>" -> rate} of
    one gate's scores [N] and decisions [N] on prompts with labels [N] and sources [N]."""
    labels, sources = np.asarray(labels, dtype=object), np.asarray(sources, dtype=object)
    unsafe = labels == "unsafe"
    aurocs = {name: auroc_ci(scores[m], unsafe[m], n_bootstrap, seed)
              for name, m in contrast_masks(labels, sources).items()}
    fired: dict[str, Any] = {}
    for lab in ("unsafe", "safe"):
        if (labels == lab).any():
            fired[lab] = rate(fires[labels == lab])
        for src in sorted(set(sources[labels == lab])):
            fired[f"{lab}/{src}"] = rate(fires[(labels == lab) & (sources == src)])
    return {"auroc": aurocs, "fires": fired}
