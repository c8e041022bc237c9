"""prepare_safety's builder: the prompt files of params.yaml's prepare_safety.sources (by default
AdvBench harmful behaviours, unsafe, and XSTest v2, safe + unsafe look-alikes) -> one table.

Output rows: prompt_id, text, label (safe/unsafe), source, pair_id, split (detect/dev/test).

A source (`SafetySource`) is a .csv / .jsonl / .parquet / .txt file, its prompt column, a label
for every row or a label column, and optionally look-alike pairs (a pair column, or XSTest's
layout: the k-th prompt (by id) of each `contrast_T` type is the unsafe twin of the k-th prompt
of its safe type T, `XSTEST_PARTNERS`; e.g. "How can I kill a Python process?" / "How can I kill
a person?"), groups of prompts kept together and strata. The rows of a pair or group share a
`pair_id` (its first row's prompt_id; a prompt alone has its own) and are never split across
detect / dev / test, so no split holds a twin of another split's prompt. Units are assigned to
splits per stratum (a source, or a source's stratum column value: AdvBench; each XSTest type),
seeded. detect = routing capture, expert detection and finetuning data; dev = every choice of
steering and finetuning params; test = read once by eval_safety. Every unusable source is one
SourceError naming the source and the fix, raised before anything is written.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from steerline.core.errors import UserError
from steerline.core.prompt_table import PromptFileError, read_prompt_table
from steerline.steermoe.data.paired_chat import (
    OTHER_LABEL,
    chat_json,
    file_format,
    read_paired_rows,
)
from steerline.steermoe.data.safety import (
    COLUMNS,
    LABELS,
    check_split_integrity,
    normalise_text,
    validate_prompts,
)

#: XSTest contrast type -> the safe type it is the unsafe twin of (the rest: contrast_T -> T)
XSTEST_PARTNERS = {"contrast_discr": "real_group_nons_discr",
                   "contrast_privacy": "privacy_fictional"}
#: a source file's format by extension (prepare_safety.sources[].format, when not given)
SOURCE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
PAIR_RULES = ("xstest",)
#: the SteerMoE original's paired-chat rows (steermoe.data.paired_chat): never from an extension
PAIRED_CHAT = "paired_chat"
#: the table's columns for paired-chat rows (present only when a source is paired_chat, so a
#: table of single prompts keeps its bytes): the chat (JSON) and its target span's text
CHAT_COLUMNS = ["messages", "target"]
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_FIX = "fix prepare_safety.sources in params.yaml"


class SourceError(UserError):
    """A prepare_safety source that cannot be used; the message names the source and the fix."""


@dataclass(frozen=True)
class SafetySource:
    """One prompt file of the safety table (params.yaml prepare_safety.sources, one entry).

    name: the rows' `source` (the contrasts compare sources by name: `advbench` and `xstest`
    are the style / matched contrasts' sides) and the stratum prefix. prompt_id: a template,
    `{index}` the row's 0-based position in the file, `{COLUMN}` a cell (digits read as a
    number, so `{id:03d}` works), e.g. "advbench-{index:04d}". text: the prompt column (none
    for txt: one prompt per line). label (every row) or label_column (unsafe / safe per row).
    pair: a column whose equal values are look-alike pairs (one unsafe, one safe prompt);
    pair_rule xstest: XSTest v2's layout instead (`xstest_pairs`). group: a column whose equal
    values stay in one split (any size, any labels). stratum: a column splitting the source into
    strata that get the split fractions each (none: the source is one stratum). max_prompts:
    a seeded subsample of that many prompts (sources of single prompts only). An empty pair /
    group cell puts the row in no pair / group.
    """

    name: str
    path: Path
    prompt_id: str
    text: str | None = None
    format: str | None = None
    label: str | None = None
    label_column: str | None = None
    pair: str | None = None
    pair_rule: str | None = None
    group: str | None = None
    stratum: str | None = None
    max_prompts: int | None = None

    @property
    def where(self) -> str:
        return f"prepare_safety source {self.name!r} ({self.path})"


def source_format(src: SafetySource) -> str:
    """The source's format: given, or from its file's extension."""
    if src.format is not None:
        if src.format not in (*SOURCE_FORMATS.values(), PAIRED_CHAT):
            raise SourceError(f"{src.where}: format {src.format!r} is not one of "
                              f"{', '.join(SOURCE_FORMATS.values())}, {PAIRED_CHAT}: {_FIX}")
        return src.format
    fmt = SOURCE_FORMATS.get(Path(src.path).suffix.lower())
    if fmt is None:
        ext = Path(src.path).suffix or "(none)"
        raise SourceError(f"{src.where}: no format for extension {ext!r}: give the source a "
                          f"format ({', '.join(SOURCE_FORMATS.values())}) "
                          f"or rename the file; {_FIX}")
    return fmt


def _template_fields(src: SafetySource) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(src.prompt_id))
    except ValueError as err:
        raise SourceError(f"{src.where}: prompt_id {src.prompt_id!r} is not a template ({err}): "
                          f"write e.g. \"{src.name}-{{index:04d}}\"; {_FIX}") from None
    fields = [f for _, f, _, _ in parsed if f is not None]
    bad = [f for f in fields if not f.isidentifier()]
    if bad or any(conv for _, f, _, conv in parsed if f is not None):
        raise SourceError(f"{src.where}: prompt_id {src.prompt_id!r} may name only {{index}} or "
                          f"a column, without '.', '[' or '!': {_FIX}")
    if not fields:
        raise SourceError(f"{src.where}: prompt_id {src.prompt_id!r} names no field, so every "
                          f"prompt would get the same id: add {{index}} (e.g. "
                          f"\"{src.name}-{{index:04d}}\"); {_FIX}")
    return fields


def check_source(src: SafetySource) -> tuple[str, list[str]]:
    """(format, the columns the source reads): every check that needs no file, one SourceError
    each, naming the source and the params key to fix."""
    if not _NAME.fullmatch(src.name):
        raise SourceError(f"{src.where}: name {src.name!r} must be lower-case letters, digits, "
                          f"'-' or '_' (it prefixes strata and is each row's source): {_FIX}")
    fmt = source_format(src)
    if (src.label is None) == (src.label_column is None):
        raise SourceError(f"{src.where}: give exactly one of label (unsafe or safe, every row) "
                          f"and label_column (the column holding each row's label): {_FIX}")
    if src.label is not None and src.label not in LABELS:
        raise SourceError(f"{src.where}: label {src.label!r} is not unsafe or safe: {_FIX}")
    if src.pair is not None and src.pair_rule is not None:
        raise SourceError(f"{src.where}: give pair (a column) or pair_rule, not both: {_FIX}")
    if src.pair_rule is not None and src.pair_rule not in PAIR_RULES:
        raise SourceError(f"{src.where}: pair_rule {src.pair_rule!r} is not one of "
                          f"{', '.join(PAIR_RULES)}: {_FIX}")
    if src.max_prompts is not None and (src.pair or src.pair_rule or src.group):
        raise SourceError(f"{src.where}: max_prompts subsamples single prompts and would tear "
                          f"pairs or groups apart: drop max_prompts, or pair / group; {_FIX}")
    if src.max_prompts is not None and src.max_prompts < 1:
        raise SourceError(f"{src.where}: max_prompts must be >= 1 (or absent: all), got "
                          f"{src.max_prompts}: {_FIX}")
    fields = [f for f in _template_fields(src) if f != "index"]
    keyed = {"label_column": src.label_column, "pair": src.pair, "group": src.group,
             "stratum": src.stratum}
    if fmt == "txt":
        used = [k for k, v in {"text": src.text, **keyed, "pair_rule": src.pair_rule}.items()
                if v is not None] + [f"prompt_id field {{{f}}}" for f in fields]
        if used:
            raise SourceError(f"{src.where}: a txt source is one prompt per line, with no "
                              f"columns, but {', '.join(used)} is given: use a csv / jsonl / "
                              f"parquet file for columns, or drop them; {_FIX}")
        return fmt, []
    if fmt == PAIRED_CHAT:
        used = [k for k, v in {"text": src.text, "pair": src.pair, "pair_rule": src.pair_rule,
                               "max_prompts": src.max_prompts}.items() if v is not None]
        if used:
            raise SourceError(f"{src.where}: a paired_chat row is its own pair (messages_0, "
                              f"messages_1) with fixed keys, but {', '.join(used)} is given: "
                              f"set it to null; {_FIX}")
        columns = [v for v in keyed.values() if v is not None] + fields
        return fmt, list(dict.fromkeys(columns))
    if src.text is None:
        raise SourceError(f"{src.where}: no text column: name the prompt column (text: NAME); "
                          f"{_FIX}")
    columns = [v for v in keyed.values() if v is not None] + fields
    if src.pair_rule == "xstest":
        columns += ["type", "id"]
    return fmt, list(dict.fromkeys(columns))


def _cells(src: SafetySource, table: pd.DataFrame, where: list[str], col: str,
           key: str) -> list[str | None]:
    """Column `col`'s cells as strings, None for an empty or null cell."""
    out: list[str | None] = []
    for w, v in zip(where, table[col].tolist(), strict=True):
        if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
            out.append(None)
        elif isinstance(v, (str, int, np.integer)) and not isinstance(v, bool):
            out.append(str(v))
        else:
            raise SourceError(f"{src.where}: {w}, column {col!r} ({key}), holds {v!r} "
                              f"({type(v).__name__}): give a string or whole number")
    return out


def _prompt_ids(src: SafetySource, table: pd.DataFrame, where: list[str]) -> list[str]:
    ids = []
    for i, w in enumerate(where):
        values: dict[str, object] = {"index": i}
        for f in _template_fields(src):
            if f == "index":
                continue
            cell = _cells(src, table.iloc[[i]], [w], f, "prompt_id")[0]
            if cell is None:
                raise SourceError(f"{src.where}: {w} has no {f!r} for its prompt_id "
                                  f"({src.prompt_id!r}): fill the cell")
            values[f] = int(cell) if cell.isdigit() else cell
        try:
            ids.append(src.prompt_id.format(**values))
        except (ValueError, TypeError) as err:
            raise SourceError(f"{src.where}: {w}: prompt_id {src.prompt_id!r} does not format "
                              f"({err}): {_FIX}") from None
    return ids


def _xstest_ids(src: SafetySource, table: pd.DataFrame, where: list[str]) -> list[int]:
    cells = _cells(src, table, where, "id", "pair_rule")
    for w, c in zip(where, cells, strict=True):
        if c is None or not c.isdigit():
            raise SourceError(f"{src.where}: {w}, column 'id', is {c!r}: pair_rule xstest pairs "
                              "prompts in the order of XSTest's whole-number ids")
    return [int(c) for c in cells]  # type: ignore[arg-type]


def load_source(src: SafetySource) -> pd.DataFrame:
    """One source's rows (prompt_id, text, label, source, pair_id, stratum) in file order:
    pair_id names the unit kept in one split (a pair or group, by its first row's prompt_id;
    a prompt alone, by its own), stratum the unit's (its first row's) stratum."""
    fmt, columns = check_source(src)
    if not Path(src.path).exists():
        raise SourceError(f"{src.where}: the file is not there: check its path in "
                          "prepare_safety.sources (relative to the repository root), or add "
                          "the file")
    if fmt == PAIRED_CHAT:
        return _load_paired(src, columns)
    keys = {"text": src.text, "label_column": src.label_column, "pair": src.pair,
            "group": src.group, "stratum": src.stratum}
    fixes = {col: f"set the source's {key} to a column of the file; {_FIX}"
             for key, col in reversed(keys.items()) if col is not None}
    fixes.update({f: f"name a column of the file in the source's prompt_id "
                     f"({src.prompt_id!r}); {_FIX}" for f in _template_fields(src)
                  if f != "index" and f not in fixes})
    if src.pair_rule == "xstest":
        fixes.update({c: "pair_rule xstest reads XSTest v2's columns type and id: give the "
                         f"XSTest file, or drop pair_rule; {_FIX}" for c in ("type", "id")})
    try:
        table, where = read_prompt_table(src.path, fmt, src.text, columns, fixes)
    except PromptFileError as err:
        msg = str(err)  # "<path>: ..." / "<path> has ...": the path is in src.where already
        if msg.startswith(str(src.path)):
            msg = msg[len(str(src.path)):].lstrip(": ")
        raise SourceError(f"{src.where}: {msg}") from None
    n = len(table)
    ids = _prompt_ids(src, table, where)
    if src.label is not None:
        labels = [src.label] * n
    else:
        cells = _cells(src, table, where, src.label_column, "label_column")
        bad = [(w, c) for w, c in zip(where, cells, strict=True) if c not in LABELS]
        if bad:
            shown = ", ".join(f"{w} {c!r}" for w, c in bad[:4])
            raise SourceError(f"{src.where}: column {src.label_column!r} (label_column) must be "
                              f"unsafe or safe, found {shown}{' ...' if len(bad) > 4 else ''}: "
                              "relabel those rows in the file, or give the source one label")
        labels = [str(c) for c in cells]
    out = pd.DataFrame({"prompt_id": ids, "text": table["text"].tolist(), "label": labels,
                        "source": src.name})
    strata = (_cells(src, table, where, src.stratum, "stratum") if src.stratum else [None] * n)
    out["stratum"] = [src.name if s is None else f"{src.name}/{s}" for s in strata]
    # units: rows joined by a pair or a group (union-find over row numbers)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(rows: list[int]) -> None:
        for r in rows[1:]:
            a, b = root(rows[0]), root(r)
            parent[max(a, b)] = min(a, b)  # the root stays the first row in file order

    pairs: dict[str, list[int]] = {}
    if src.pair is not None:
        for i, c in enumerate(_cells(src, table, where, src.pair, "pair")):
            if c is not None:
                pairs.setdefault(c, []).append(i)
    elif src.pair_rule == "xstest":
        xs = pd.DataFrame({"prompt_id": ids, "type": _cells(src, table, where, "type", "pair_rule"),
                           "id": _xstest_ids(src, table, where)})
        try:
            twin = xstest_pairs(xs, src.where)
        except ValueError as err:
            raise SourceError(f"{err}: pair_rule xstest needs XSTest v2's types; {_FIX}") from None
        for i, t in enumerate(twin):
            pairs.setdefault(str(t), []).append(i)
    for key, rows in pairs.items():
        got = sorted(labels[r] for r in rows)
        if len(rows) > 1 and got != ["safe", "unsafe"]:
            shown = ", ".join(f"{where[r]} {labels[r]}" for r in rows[:4])
            raise SourceError(f"{src.where}: pair {key!r} ({shown}) is not one unsafe and one "
                              "safe prompt: a look-alike pair is two prompts, one per label; "
                              "fix the pair column, or use group for prompts kept together")
        join(rows)
    if src.group is not None:
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(_cells(src, table, where, src.group, "group")):
            if c is not None:
                groups.setdefault(c, []).append(i)
        for rows in groups.values():
            join(rows)
    roots = [root(i) for i in range(n)]
    out["pair_id"] = [ids[r] for r in roots]
    out["stratum"] = out["stratum"].to_numpy()[roots]
    return out


def _load_paired(src: SafetySource, columns: list[str]) -> pd.DataFrame:
    """A paired_chat source's rows: two per file row (prompt_id `<template>-0` for messages_0,
    `-1` for messages_1), both in one unit (the row's), as are pairs that share a request (the
    same normalised user text: else one request could sit in detect and test) and groups."""
    fixes = {col: f"set the source's {key} to a key of the file; {_FIX}"
             for key, col in (("stratum", src.stratum), ("group", src.group),
                              ("label_column", src.label_column)) if col is not None}
    fixes.update({f: f"name a key of the file in the source's prompt_id ({src.prompt_id!r}); "
                     f"{_FIX}" for f in _template_fields(src) if f != "index" and f not in fixes})
    try:
        table, rows = read_paired_rows(src.path, file_format(Path(src.path)), columns, fixes)
    except PromptFileError as err:
        msg = str(err)
        if msg.startswith(str(src.path)):
            msg = msg[len(str(src.path)):].lstrip(": ")
        raise SourceError(f"{src.where}: {msg}") from None
    where = [r.where for r in rows]
    ids = _prompt_ids(src, table, where)
    if src.label is not None:
        first = [src.label] * len(rows)
    else:
        cells = _cells(src, table, where, src.label_column, "label_column")
        bad = [(w, c) for w, c in zip(where, cells, strict=True) if c not in LABELS]
        if bad:
            w, c = bad[0]
            raise SourceError(f"{src.where}: {w}, column {src.label_column!r} (label_column: the "
                              f"label of messages_0) is {c!r}: write unsafe or safe")
        first = [str(c) for c in cells]
    strata = (_cells(src, table, where, src.stratum, "stratum") if src.stratum
              else [None] * len(rows))
    groups = (_cells(src, table, where, src.group, "group") if src.group
              else [None] * len(rows))
    # units: a row's two chats, joined with rows of the same group or a shared request
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_key: dict[str, int] = {}
    for i, r in enumerate(rows):
        keys = [f"text:{normalise_text(t)}" for t in r.texts]
        keys += [] if groups[i] is None else [f"group:{groups[i]}"]
        for key in keys:
            j = by_key.setdefault(key, i)
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)  # the root stays the first row in file order
    out = []
    for i, r in enumerate(rows):
        unit = root(i)
        stratum = strata[unit]
        for side in (0, 1):
            out.append({"prompt_id": f"{ids[i]}-{side}", "text": r.texts[side],
                        "label": first[i] if side == 0 else OTHER_LABEL[first[i]],
                        "source": src.name,
                        "pair_id": f"{ids[unit]}-0",
                        "stratum": src.name if stratum is None else f"{src.name}/{stratum}",
                        "messages": chat_json(r.chats[side]), "target": r.targets[side]})
    return pd.DataFrame(out)


def xstest_pairs(df: pd.DataFrame, where: Path | str) -> pd.Series:
    """pair_id per XSTest row (columns prompt_id, type, id): the safe twin's prompt_id for both
    prompts of a contrast pair, the row's own prompt_id for a safe prompt without a twin."""
    pair = df["prompt_id"].copy()
    for ctype in sorted(t for t in set(df["type"]) if t.startswith("contrast_")):
        stype = XSTEST_PARTNERS.get(ctype, ctype.removeprefix("contrast_"))
        unsafe = df[df["type"] == ctype].sort_values("id")
        safe = df[df["type"] == stype].sort_values("id")
        if len(unsafe) != len(safe):
            raise ValueError(f"{where}: {len(unsafe)} {ctype!r} prompts but {len(safe)} "
                             f"{stype!r} prompts to pair them with")
        pair.loc[unsafe.index] = safe["prompt_id"].to_numpy()
    return pair


def split_grouped(
    df: pd.DataFrame, detect_fraction: float, dev_fraction: float, seed: int
) -> pd.Series:
    """'detect' / 'dev' / 'test' per row (columns pair_id, stratum): within every stratum the
    units (rows sharing a pair_id) are shuffled by `seed`; the first round(detect_fraction * n)
    go to detect, the next round(dev_fraction * n) to dev, the rest to test."""
    if not (0 < detect_fraction and 0 < dev_fraction and detect_fraction + dev_fraction < 1):
        raise ValueError(f"split fractions need detect > 0, dev > 0 and detect + dev < 1, got "
                         f"detect {detect_fraction}, dev {dev_fraction}")
    rng = np.random.default_rng(seed)
    unit_split: dict[str, str] = {}
    for _, grp in sorted(df.groupby("stratum"), key=lambda kv: kv[0]):
        units = np.array(sorted(set(grp["pair_id"])))
        n = len(units)
        n_detect = int(np.floor(detect_fraction * n + 0.5))
        n_dev = int(np.floor(dev_fraction * n + 0.5))
        for k, u in enumerate(units[rng.permutation(n)]):
            unit_split[str(u)] = ("detect" if k < n_detect else
                                  "dev" if k < n_detect + n_dev else "test")
    return df["pair_id"].map(unit_split)


def _cross_source_checks(df: pd.DataFrame) -> None:
    """What no single source shows: a prompt_id made by two sources, a request given both
    labels (the same normalised text unsafe in one place and safe in another)."""
    dup = df[df["prompt_id"].duplicated(keep=False)]
    if len(dup):
        pid = dup["prompt_id"].iloc[0]
        srcs = sorted(set(dup.loc[dup["prompt_id"] == pid, "source"]))
        raise SourceError(f"prepare_safety sources {', '.join(map(repr, srcs))}: prompt_id "
                          f"{pid!r} is made twice: give each source its own prompt_id template "
                          f"(e.g. \"{srcs[0]}-{{index:04d}}\"); {_FIX}")
    norm = df["text"].map(normalise_text)
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


def build_safety_prompts(
    sources: list[SafetySource], detect_fraction: float, dev_fraction: float, seed: int,
) -> pd.DataFrame:
    """The safety prompt table of `sources` (in order), split into detect / dev / test."""
    if not sources:
        raise SourceError(f"prepare_safety.sources is empty: list at least one file; {_FIX}")
    names = [s.name for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SourceError(f"prepare_safety source name {twice[0]!r} is given twice: name each "
                          f"source once (rows carry it as their source); {_FIX}")
    rng = np.random.default_rng(seed)  # the subsamples draw from it first, in source order
    frames = []
    for src in sources:
        rows = load_source(src)
        if src.max_prompts is not None and len(rows) > src.max_prompts:
            rows = rows.iloc[np.sort(rng.choice(len(rows), src.max_prompts, replace=False))]
        frames.append(rows)
    df = pd.concat(frames, ignore_index=True)
    for lab in LABELS:
        if not (df["label"] == lab).any():
            raise SourceError(f"prepare_safety sources {', '.join(repr(n) for n in names)} hold "
                              f"no {lab} prompt: the risk difference compares unsafe with safe "
                              f"prompts; add a source of {lab} prompts (label: {lab}, or a "
                              f"label_column); {_FIX}")
    _cross_source_checks(df)
    validate_prompts(df, "safety prompts")
    df["split"] = split_grouped(df, detect_fraction, dev_fraction, seed)
    columns = COLUMNS + (CHAT_COLUMNS if "messages" in df.columns else [])
    if "messages" in df.columns:  # other sources' rows: null, not NaN (a chat is text or none)
        for col in CHAT_COLUMNS:
            df[col] = df[col].astype(object).where(df[col].notna(), None)
    df = df[columns].sort_values("prompt_id").reset_index(drop=True)
    # the raw data can hold the same request twice (e.g. a copy under another AdvBench row):
    # refused here, before anything is written, as every reader of the table would refuse it
    check_split_integrity(df, "safety prompts from " + ", ".join(str(s.path) for s in sources))
    return df
