"""One prompt file of prepare_safety.sources (by default AdvBench harmful behaviours, unsafe, and
XSTest v2, safe + unsafe look-alikes) -> its rows, units joined (steermoe.data.safety_table
builds the table from all sources; steermoe.data.safety_splits splits it).

A source (`SafetySource`) is a .csv / .jsonl / .parquet / .txt file, its prompt column, a label
for every row or a label column, and optionally look-alike pairs (a pair column, or XSTest's
layout: the k-th prompt (by id) of each `contrast_T` type is the unsafe twin of the k-th prompt
of its safe type T, `XSTEST_PARTNERS`; e.g. "How can I kill a Python process?" / "How can I kill
a person?"), groups of prompts kept together and strata. The rows of a pair or group share a
`pair_id` (its first row's prompt_id; a prompt alone has its own) and are never split across
detect / dev / test, so no split holds a twin of another split's prompt. Units are assigned to
splits per stratum (a source, or a source's stratum column value: AdvBench; each XSTest type),
seeded, in source order (a source added at the end leaves the others' splits as they were).
detect = routing capture, expert detection and finetuning data (sources with detection true;
the prompt gates train on every source's); dev = every choice of steering, gating and
finetuning params; test = read once by eval_safety. Every unusable source is one
SourceError naming the source and the fix, raised before anything is written.
"""


from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
from steerline.steermoe.data.safety import LABELS, request_key
from steerline.steermoe.data.safety_splits import Units

#: XSTest contrast type -> the safe type it is the unsafe twin of (the rest: contrast_T -> T)
XSTEST_PARTNERS = {"contrast_discr": "real_group_nons_discr",
                   "contrast_privacy": "privacy_fictional"}
#: a source file's format by extension (prepare_safety.sources[].format, when not given)
SOURCE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
#: the SteerMoE original's paired-chat rows (steermoe.data.paired_chat): never from an extension
PAIRED_CHAT = "paired_chat"
SourceFormat = Literal["csv", "jsonl", "parquet", "txt", "paired_chat"]
#: the table's columns for paired-chat rows (present only when a source is paired_chat, so a
#: table of single prompts keeps its bytes): the chat (JSON) and its target span's text
CHAT_COLUMNS = ["messages", "target"]
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
FIX = "fix prepare_safety.sources in params.yaml"


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
    group cell puts the row in no pair / group. split: every row in that split (e.g. test: a
    source only evaluated); none: the split fractions. detection: false keeps the source's
    detect rows out of expert detection and finetuning (capture_routing, risk_diff,
    finetune_experts read `detection_prompts`); the prompt gates still train on them.

    prepare_safety builds it from params.yaml's entry (core.params.SafetySourceParams), whose
    schema has checked every key's type and value range; methods never read the params schema
    (tests/test_layers.py), so this is the method's own view of the entry.
    """

    name: str
    path: Path
    prompt_id: str
    text: str | None = None
    format: SourceFormat | None = None
    label: Literal["unsafe", "safe"] | None = None
    label_column: str | None = None
    pair: str | None = None
    pair_rule: Literal["xstest"] | None = None
    group: str | None = None
    stratum: str | None = None
    max_prompts: int | None = None
    split: Literal["detect", "dev", "test"] | None = None
    detection: bool = True

    @property
    def where(self) -> str:
        return f"prepare_safety source {self.name!r} ({self.path})"


def source_format(src: SafetySource) -> str:
    """The source's format: given, or from its file's extension."""
    if src.format is not None:
        return src.format
    fmt = SOURCE_FORMATS.get(Path(src.path).suffix.lower())
    if fmt is None:
        ext = Path(src.path).suffix or "(none)"
        raise SourceError(f"{src.where}: no format for extension {ext!r}: give the source a "
                          f"format ({', '.join(SOURCE_FORMATS.values())}) "
                          f"or rename the file; {FIX}")
    return fmt


def _template_fields(src: SafetySource) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(src.prompt_id))
    except ValueError as err:
        raise SourceError(f"{src.where}: prompt_id {src.prompt_id!r} is not a template ({err}): "
                          f"write e.g. \"{src.name}-{{index:04d}}\"; {FIX}") from None
    fields = [f for _, f, _, _ in parsed if f is not None]
    bad = [f for f in fields if not f.isidentifier()]
    if bad or any(conv for _, f, _, conv in parsed if f is not None):
        raise SourceError(f"{src.where}: prompt_id {src.prompt_id!r} may name only {{index}} or "
                          f"a column, without '.', '[' or '!': {FIX}")
    if not fields:
        raise SourceError(f"{src.where}: prompt_id {src.prompt_id!r} names no field, so every "
                          f"prompt would get the same id: add {{index}} (e.g. "
                          f"\"{src.name}-{{index:04d}}\"); {FIX}")
    return fields


def check_source(src: SafetySource) -> tuple[str, list[str]]:
    """(format, the columns the source reads): every check that needs no file, one SourceError
    each, naming the source and the params key to fix."""
    if not _NAME.fullmatch(src.name):
        raise SourceError(f"{src.where}: name {src.name!r} must be lower-case letters, digits, "
                          f"'-' or '_' (it prefixes strata and is each row's source): {FIX}")
    fmt = source_format(src)
    if (src.label is None) == (src.label_column is None):
        raise SourceError(f"{src.where}: give exactly one of label (unsafe or safe, every row) "
                          f"and label_column (the column holding each row's label): {FIX}")
    if src.pair is not None and src.pair_rule is not None:
        raise SourceError(f"{src.where}: give pair (a column) or pair_rule, not both: {FIX}")
    if src.max_prompts is not None and (src.pair or src.pair_rule or src.group):
        raise SourceError(f"{src.where}: max_prompts subsamples single prompts and would tear "
                          f"pairs or groups apart: drop max_prompts, or pair / group; {FIX}")
    fields = [f for f in _template_fields(src) if f != "index"]
    keyed = {"label_column": src.label_column, "pair": src.pair, "group": src.group,
             "stratum": src.stratum}
    if fmt == "txt":
        used = [k for k, v in {"text": src.text, **keyed, "pair_rule": src.pair_rule}.items()
                if v is not None] + [f"prompt_id field {{{f}}}" for f in fields]
        if used:
            raise SourceError(f"{src.where}: a txt source is one prompt per line, with no "
                              f"columns, but {', '.join(used)} is given: use a csv / jsonl / "
                              f"parquet file for columns, or drop them; {FIX}")
        return fmt, []
    if fmt == PAIRED_CHAT:
        used = [k for k, v in {"text": src.text, "pair": src.pair, "pair_rule": src.pair_rule,
                               "max_prompts": src.max_prompts}.items() if v is not None]
        if used:
            raise SourceError(f"{src.where}: a paired_chat row is its own pair (messages_0, "
                              f"messages_1) with fixed keys, but {', '.join(used)} is given: "
                              f"set it to null; {FIX}")
        columns = [v for v in keyed.values() if v is not None] + fields
        return fmt, list(dict.fromkeys(columns))
    if src.text is None:
        raise SourceError(f"{src.where}: no text column: name the prompt column (text: NAME); "
                          f"{FIX}")
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
                              f"({err}): {FIX}") from None
    return ids


def _xstest_ids(src: SafetySource, table: pd.DataFrame, where: list[str]) -> list[int]:
    cells = _cells(src, table, where, "id", "pair_rule")
    for w, c in zip(where, cells, strict=True):
        if c is None or not c.isdigit():
            raise SourceError(f"{src.where}: {w}, column 'id', is {c!r}: pair_rule xstest pairs "
                              "prompts in the order of XSTest's whole-number ids")
    return [int(c) for c in cells]  # type: ignore[arg-type]


def _file_error(src: SafetySource, err: PromptFileError) -> SourceError:
    """A file reader's error as the source's: "<path>: ..." / "<path> has ..." loses the path,
    which src.where names already."""
    msg = str(err)
    if msg.startswith(str(src.path)):
        msg = msg[len(str(src.path)):].lstrip(": ")
    return SourceError(f"{src.where}: {msg}")


def _labels(src: SafetySource, table: pd.DataFrame, where: list[str], key: str) -> list[str]:
    """Each row's label: the source's `label`, or its `label_column` cell (unsafe / safe; `key`
    says what the column labels, for the message)."""
    if src.label is not None:
        return [src.label] * len(where)
    cells = _cells(src, table, where, src.label_column, "label_column")
    bad = [(w, c) for w, c in zip(where, cells, strict=True) if c not in LABELS]
    if bad:
        shown = ", ".join(f"{w} {c!r}" for w, c in bad[:4])
        raise SourceError(f"{src.where}: column {src.label_column!r} ({key}) must be "
                          f"unsafe or safe, found {shown}{' ...' if len(bad) > 4 else ''}: "
                          "relabel those rows in the file, or give the source one label")
    return [str(c) for c in cells]


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
    fixes = {col: f"set the source's {key} to a column of the file; {FIX}"
             for key, col in reversed(keys.items()) if col is not None}
    fixes.update({f: f"name a column of the file in the source's prompt_id "
                     f"({src.prompt_id!r}); {FIX}" for f in _template_fields(src)
                  if f != "index" and f not in fixes})
    if src.pair_rule == "xstest":
        fixes.update({c: "pair_rule xstest reads XSTest v2's columns type and id: give the "
                         f"XSTest file, or drop pair_rule; {FIX}" for c in ("type", "id")})
    try:
        table, where = read_prompt_table(src.path, fmt, src.text, columns, fixes)
    except PromptFileError as err:
        raise _file_error(src, err) from None
    n = len(table)
    ids = _prompt_ids(src, table, where)
    labels = _labels(src, table, where, "label_column")
    out = pd.DataFrame({"prompt_id": ids, "text": table["text"].tolist(), "label": labels,
                        "source": src.name})
    strata = (_cells(src, table, where, src.stratum, "stratum") if src.stratum else [None] * n)
    out["stratum"] = [src.name if s is None else f"{src.name}/{s}" for s in strata]
    units = Units(n)  # rows joined by a pair or a group
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
            raise SourceError(f"{err}: pair_rule xstest needs XSTest v2's types; {FIX}") from None
        for i, t in enumerate(twin):
            pairs.setdefault(str(t), []).append(i)
    for key, rows in pairs.items():
        got = sorted(labels[r] for r in rows)
        if len(rows) > 1 and got != ["safe", "unsafe"]:
            shown = ", ".join(f"{where[r]} {labels[r]}" for r in rows[:4])
            raise SourceError(f"{src.where}: pair {key!r} ({shown}) is not one unsafe and one "
                              "safe prompt: a look-alike pair is two prompts, one per label; "
                              "fix the pair column, or use group for prompts kept together")
        units.join(rows)
    if src.group is not None:
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(_cells(src, table, where, src.group, "group")):
            if c is not None:
                groups.setdefault(c, []).append(i)
        for rows in groups.values():
            units.join(rows)
    roots = units.roots()
    out["pair_id"] = [ids[r] for r in roots]
    out["stratum"] = out["stratum"].to_numpy()[roots]
    return out


def _load_paired(src: SafetySource, columns: list[str]) -> pd.DataFrame:
    """A paired_chat source's rows: two per file row (prompt_id `<template>-0` for messages_0,
    `-1` for messages_1), both in one unit (the row's), as are pairs that share a request (the
    same normalised user text: else one request could sit in detect and test) and groups."""
    fixes = {col: f"set the source's {key} to a key of the file; {FIX}"
             for key, col in (("stratum", src.stratum), ("group", src.group),
                              ("label_column", src.label_column)) if col is not None}
    fixes.update({f: f"name a key of the file in the source's prompt_id ({src.prompt_id!r}); "
                     f"{FIX}" for f in _template_fields(src) if f != "index" and f not in fixes})
    try:
        table, rows = read_paired_rows(src.path, file_format(Path(src.path)), columns, fixes)
    except PromptFileError as err:
        raise _file_error(src, err) from None
    where = [r.where for r in rows]
    ids = _prompt_ids(src, table, where)
    first = _labels(src, table, where, "label_column: the label of messages_0")
    strata = (_cells(src, table, where, src.stratum, "stratum") if src.stratum
              else [None] * len(rows))
    groups = (_cells(src, table, where, src.group, "group") if src.group
              else [None] * len(rows))
    units = Units(len(rows))  # a row's two chats, joined with rows of its group or request
    by_key: dict[str, int] = {}
    for i, r in enumerate(rows):
        keys = [f"text:{request_key(t)}" for t in r.texts]
        keys += [] if groups[i] is None else [f"group:{groups[i]}"]
        for key in keys:
            units.join([i, by_key.setdefault(key, i)])
    roots = units.roots()
    out = []
    for i, r in enumerate(rows):
        unit = roots[i]
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
