"""Safety prompts: AdvBench harmful behaviours (unsafe) and XSTest v2 (safe + unsafe look-alikes).

Output rows: prompt_id, text, label (safe/unsafe), source, split (detect/test). The split is
stratified by (source, label) and seeded; the test split is never used for detection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

LABELS = ("safe", "unsafe")
COLUMNS = ["prompt_id", "text", "label", "source", "split"]


def load_advbench(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    if "goal" not in df.columns:
        raise ValueError(f"{path}: missing column 'goal' (AdvBench harmful_behaviors.csv)")
    return pd.DataFrame(
        {
            "prompt_id": [f"advbench-{i:04d}" for i in range(len(df))],
            "text": df["goal"].astype(str),
            "label": "unsafe",
            "source": "advbench",
        }
    )


def load_xstest(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    for col in ("id", "prompt", "label"):
        if col not in df.columns:
            raise ValueError(f"{path}: missing column {col!r} (XSTest xstest_prompts.csv)")
    return pd.DataFrame(
        {
            "prompt_id": [f"xstest-{int(i):03d}" for i in df["id"]],
            "text": df["prompt"].astype(str),
            "label": df["label"].astype(str),
            "source": "xstest",
        }
    )


def validate_prompts(df: pd.DataFrame, where: str) -> None:
    """One clear error for each way a prompt table can be unusable."""
    missing = [c for c in ("prompt_id", "text", "label") if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}")
    if df.empty:
        raise ValueError(f"{where}: no prompts")
    bad = sorted(set(df["label"]) - set(LABELS))
    if bad:
        raise ValueError(f"{where}: labels must be 'safe' or 'unsafe', found {bad}")
    absent = [lab for lab in LABELS if not (df["label"] == lab).any()]
    if absent:
        raise ValueError(f"{where}: no {absent[0]!r} prompts; risk difference needs both classes")
    blank = df["text"].astype(str).str.strip() == ""
    if blank.any():
        ids = list(df.loc[blank, "prompt_id"])[:5]
        raise ValueError(f"{where}: empty text for prompt(s) {ids}")
    dup = df["prompt_id"][df["prompt_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{where}: duplicate prompt_id {dup.iloc[0]!r}")


def split_stratified(df: pd.DataFrame, detect_fraction: float, seed: int) -> pd.Series:
    """'detect'/'test' per row, the detect fraction taken within every (source, label) group."""
    rng = np.random.default_rng(seed)
    split = pd.Series("test", index=df.index)
    for _, idx in sorted(df.groupby(["source", "label"]).groups.items()):
        idx = np.asarray(sorted(idx))
        n_detect = int(round(detect_fraction * len(idx)))
        split.loc[rng.permutation(idx)[:n_detect]] = "detect"
    return split


def build_safety_prompts(
    advbench: Path, xstest: Path, detect_fraction: float, advbench_max: int, seed: int
) -> pd.DataFrame:
    adv = load_advbench(advbench)
    rng = np.random.default_rng(seed)
    if len(adv) > advbench_max:
        adv = adv.iloc[np.sort(rng.choice(len(adv), advbench_max, replace=False))]
    df = pd.concat([adv, load_xstest(xstest)], ignore_index=True)
    validate_prompts(df, "safety prompts")
    df["split"] = split_stratified(df, detect_fraction, seed)
    return df[COLUMNS].sort_values("prompt_id").reset_index(drop=True)
