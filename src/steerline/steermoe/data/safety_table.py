"""prepare_safety's table: the rows of params.yaml's prepare_safety.sources (each read by
steermoe.data.safety_sources) checked across sources and split into detect / dev / test
(steermoe.data.safety_splits).

Output rows: prompt_id, text, label (safe/unsafe), source, pair_id, split (detect/dev/test),
detection (the source's `detection`), plus messages and target when a source is paired_chat.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from steerline.steermoe.data.safety import (
    COLUMNS,
    LABELS,
    check_split_integrity,
    request_key,
    validate_prompts,
)
from steerline.steermoe.data.safety_sources import (
    CHAT_COLUMNS,
    FIX,
    SafetySource,
    SourceError,
    load_source,
)
from steerline.steermoe.data.safety_splits import stratified_unit_split


def _cross_source_checks(df: pd.DataFrame) -> None:
    """What no single source shows: a prompt_id made by two sources, a request given both
    labels (the same normalised text unsafe in one place and safe in another)."""
    dup = df[df["prompt_id"].duplicated(keep=False)]
    if len(dup):
        pid = dup["prompt_id"].iloc[0]
        srcs = sorted(set(dup.loc[dup["prompt_id"] == pid, "source"]))
        raise SourceError(f"prepare_safety sources {', '.join(map(repr, srcs))}: prompt_id "
                          f"{pid!r} is made twice: give each source its own prompt_id template "
                          f"(e.g. \"{srcs[0]}-{{index:04d}}\"); {FIX}")
    norm = df["text"].map(request_key)
    if "messages" in df.columns:  # a paired chat is its whole chat and target, not its request
        chat = df["messages"].notna()
        norm = norm.where(~chat, "chat:" + df["messages"].astype(str) + "\x00"
                          + df["target"].astype(str))
    both = df[norm.ne("")].groupby(norm[norm.ne("")])["label"].nunique()
    if (both > 1).any():
        rows = df[norm == both[both > 1].index[0]]
        shown = ", ".join(f"{p} ({s}, {lab})" for p, s, lab in zip(
            rows["prompt_id"], rows["source"], rows["label"], strict=True))
        raise SourceError(f"prepare_safety sources: one request carries both labels: {shown}: a "
                          "prompt is unsafe or safe, not both; remove it from one source")


def _check_detection_rows(df: pd.DataFrame, names: list[str]) -> None:
    """Expert detection contrasts unsafe with safe prompts of the sources with detection true
    (split by the fractions or fixed to detect): both labels must be there."""
    usable = df["detection"] & df["fixed_split"].isin([None, "detect"])
    for lab in LABELS:
        if not (df.loc[usable, "label"] == lab).any():
            raise SourceError(f"prepare_safety sources {', '.join(repr(n) for n in names)}: no "
                              f"{lab} prompt reaches expert detection (sources with detection "
                              f"true whose split is null or detect): set detection true on a "
                              f"source of {lab} prompts; {FIX}")


def build_safety_prompts(
    sources: list[SafetySource], detect_fraction: float, dev_fraction: float, seed: int,
) -> pd.DataFrame:
    """The safety prompt table of `sources` (in order), split into detect / dev / test."""
    if not sources:
        raise SourceError(f"prepare_safety.sources is empty: list at least one file; {FIX}")
    names = [s.name for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SourceError(f"prepare_safety source name {twice[0]!r} is given twice: name each "
                          f"source once (rows carry it as their source); {FIX}")
    rng = np.random.default_rng(seed)  # the subsamples draw from it first, in source order
    frames = []
    for src in sources:
        rows = load_source(src)
        if src.max_prompts is not None and len(rows) > src.max_prompts:
            rows = rows.iloc[np.sort(rng.choice(len(rows), src.max_prompts, replace=False))]
        frames.append(rows.assign(detection=src.detection, fixed_split=src.split))
    df = pd.concat(frames, ignore_index=True)
    for lab in LABELS:
        if not (df["label"] == lab).any():
            raise SourceError(f"prepare_safety sources {', '.join(repr(n) for n in names)} hold "
                              f"no {lab} prompt: the risk difference compares unsafe with safe "
                              f"prompts; add a source of {lab} prompts (label: {lab}, or a "
                              f"label_column); {FIX}")
    _cross_source_checks(df)
    validate_prompts(df, "safety prompts")
    _check_detection_rows(df, names)
    free = df["fixed_split"].isna()
    df["split"] = df["fixed_split"].astype(object)
    df.loc[free, "split"] = stratified_unit_split(df[free], detect_fraction, dev_fraction, seed,
                                                  names)
    columns = COLUMNS + (CHAT_COLUMNS if "messages" in df.columns else [])
    if "messages" in df.columns:  # other sources' rows: null, not NaN (a chat is text or none)
        for col in CHAT_COLUMNS:
            df[col] = df[col].astype(object).where(df[col].notna(), None)
    df = df[columns].sort_values("prompt_id").reset_index(drop=True)
    # the raw data can hold the same request twice (e.g. a copy under another AdvBench row):
    # refused here, before anything is written, as every reader of the table would refuse it
    check_split_integrity(df, "safety prompts from " + ", ".join(str(s.path) for s in sources))
    return df
