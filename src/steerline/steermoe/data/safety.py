"""The safety prompt table as the stages read it: prompt_id, text, label (safe/unsafe), source,
pair_id, split (detect/dev/test), detection (whether the row's source feeds expert detection and
finetuning), written by prepare_safety (steermoe.data.safety_table).

The rows of a look-alike pair or group share a `pair_id` and are never split across detect /
dev / test; detect = routing capture, expert detection and finetuning data; dev = every choice
of steering and finetuning params; test = read once by eval_safety. `read_safety_prompts`
checks the splits for leaks (`check_split_integrity`) before any caller picks a split.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pandas as pd

from steerline.core.chat import is_blank
from steerline.core.errors import UserError
from steerline.core.splits import groups_across_splits

LABELS = ("safe", "unsafe")
COLUMNS = ["prompt_id", "text", "label", "source", "pair_id", "split", "detection"]
SPLITS = ("detect", "dev", "test")


def check_prompt_texts(prompts: pd.DataFrame, where: str) -> None:
    """Every prompt_id and text a non-null, non-blank string; the message names the prompt."""
    for col in ("prompt_id", "text"):
        if col not in prompts.columns:
            raise ValueError(f"{where}: missing column {col!r}")
    for pid, text in zip(prompts["prompt_id"], prompts["text"], strict=True):
        if not isinstance(pid, str) or is_blank(pid):
            raise ValueError(f"{where}: prompt_id {pid!r} (text {str(text)[:40]!r}) is not a "
                             "non-empty string: give every prompt a string id")
        if text is None or (isinstance(text, float) and text != text):
            raise ValueError(f"{where}: prompt {pid!r} has no text (null): remove it or give it "
                             "text")
        if not isinstance(text, str):
            raise ValueError(f"{where}: prompt {pid!r} has text {text!r} of type "
                             f"{type(text).__name__}: every prompt needs a non-empty string")
        if is_blank(text):
            raise ValueError(f"{where}: prompt {pid!r} has blank text (only whitespace or "
                             "control characters): remove it or give it text")


def request_key(text: str) -> str:
    """A prompt's text as a request: NFKC, case-folded, every run of punctuation, symbols and
    whitespace one space. Two prompts equal under it ask the model the same thing. Not
    mat_steer's dedup_key (ASCII only): a request in another script must not key as empty."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", folded).split())


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_split_integrity(prompts: pd.DataFrame, where: str) -> None:
    """The safety prompt table's splits hold no leak, checked wherever a stage reads the table
    (a leak would otherwise pass silently: risk_diff dropped repeated ids, eval_safety scored a
    test prompt the model was fine-tuned on). Rules, on the columns the table has:

    - prompt_id unique over the whole table;
    - split (when present) one of detect / dev / test;
    - with split and text: no normalised text (`request_key`) in both test and detect or
      dev (the same text twice inside one split is not a leak and is not checked here);
    - with split and pair_id: every XSTest look-alike pair (rows sharing a pair_id) in one split.

    prepare_safety's table has every column; tables without split (written before the splits,
    or by tests) get the id rule only. All violations are reported in one UserError that names
    the prompts.
    """
    if "prompt_id" not in prompts.columns:
        raise UserError(f"{where}: missing column 'prompt_id': rerun prepare_safety")
    ids = prompts["prompt_id"].astype(str)
    problems: list[str] = []
    dup = sorted(set(ids[ids.duplicated()]))
    if dup:
        problems.append(f"prompt_id repeated: {_names(dup)}")
    if "split" in prompts.columns:
        split = prompts["split"]
        odd = sorted(set(ids[~split.isin(SPLITS)]))
        if odd:
            problems.append(f"split not one of {'/'.join(SPLITS)}: {_names(odd)}")
        if "text" in prompts.columns:
            norm = prompts["text"].map(lambda t: request_key(t) if isinstance(t, str) else "")
            held_out = (split == "test").to_numpy()
            # an empty normal form ("?!") says nothing about the request: never a match
            test_of: dict[str, list[str]] = {}
            for pid, n in zip(ids[held_out], norm[held_out], strict=True):
                if n:
                    test_of.setdefault(n, []).append(pid)
            leaks = [f"{pid} ({s}) = {'/'.join(test_of[n])} (test)"
                     for pid, s, n in zip(ids[~held_out], split[~held_out], norm[~held_out],
                                          strict=True) if n in test_of]
            if leaks:
                problems.append(f"text shared with the test split: {_names(leaks)}")
        if "pair_id" in prompts.columns:
            crossing = prompts[prompts["pair_id"].isin(
                groups_across_splits(prompts["pair_id"], prompts["split"]))]
            torn = [f"{pair} (" + ", ".join(f"{pid} {s}" for pid, s in zip(
                        grp["prompt_id"].astype(str), grp["split"], strict=True)) + ")"
                    for pair, grp in crossing.groupby("pair_id", sort=True)]
            if torn:
                problems.append(f"look-alike pair across splits: {_names(sorted(torn))}")
    if problems:
        raise UserError(f"{where}: split integrity broken: {'; '.join(problems)}: rebuild the "
                        "table with prepare_safety (dvc repro prepare_safety), removing any "
                        "repeated prompt from data/raw")


def read_safety_prompts(path: Path) -> pd.DataFrame:
    """The safety prompt table (prepare_safety's output) as the stages read it: the whole table,
    its split integrity checked before any caller picks a split from it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found: run prepare_safety first (dvc repro prepare_safety)")
    prompts = pd.read_parquet(path)
    check_split_integrity(prompts, str(path))
    return prompts


def detection_prompts(prompts: pd.DataFrame) -> pd.DataFrame:
    """The rows expert detection and finetuning read: the detect split of the sources with
    detection true (a table without the split or detection column: every row it has)."""
    keep = pd.Series(True, index=prompts.index)
    if "split" in prompts.columns:
        keep &= prompts["split"] == "detect"
    if "detection" in prompts.columns:
        keep &= prompts["detection"].astype(bool)
    return prompts[keep]


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
    check_prompt_texts(df, where)
    dup = df["prompt_id"][df["prompt_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{where}: duplicate prompt_id {dup.iloc[0]!r}")


