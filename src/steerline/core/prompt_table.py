"""A file of prompts with more than its prompts (a table): the reader SteerMoE's prompt files and
sources and MAT-Steer's user attribute files share.

Formats: `.txt` (one prompt per line, no columns), `.csv`, `.jsonl` (one JSON object per line)
and `.parquet`. Every way a file can be unusable is one PromptFileError (a UserError: one line, no
traceback) that names the file, the line or row, and the fix, raised before anything is written:
a missing, unknown-format or empty file, a missing column or key, a blank, null or non-string
prompt, text that is not UTF-8.

Where a prompt is: `.txt` and `.jsonl` by line (1-based, as an editor shows it), `.csv` and
`.parquet` by data row (1-based, the CSV header not counted: a quoted cell may span lines).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from steerline.core.errors import UserError

FORMATS = (".txt", ".csv", ".jsonl", ".parquet")


class PromptFileError(UserError):
    """A prompt file that cannot be used; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class Prompt:
    text: str
    where: str  # "line 3" / "row 3": for messages


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a BOM dropped); invalid bytes are an error naming their line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise PromptFileError(
            f"{path}: line {line} is not UTF-8 text (byte {data[err.start]:#04x} at offset "
            f"{err.start}): save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _check_text(path: Path, value: object, where: str, column: str | None) -> str:
    cell = f"{where}" if column is None else f"{where}, column {column!r},"
    if value is None or (isinstance(value, float) and value != value):
        raise PromptFileError(f"{path}: {cell} has no prompt (null): remove the row or give "
                              "it text")
    if not isinstance(value, str):
        raise PromptFileError(f"{path}: {cell} holds {value!r} ({type(value).__name__}), not "
                              "text: every prompt must be a string")
    if not value.strip():
        raise PromptFileError(f"{path}: {cell} is a blank prompt: remove it or give it text")
    return value


def _missing_column(path: Path, column: str, have: list[str], column_fix: str) -> PromptFileError:
    return PromptFileError(
        f"{path} has no column {column!r} (it has {', '.join(map(repr, have)) or 'none'}): "
        f"{column_fix}"
    )


def _read_txt(path: Path, text: str) -> list[Prompt]:
    lines = text.splitlines()  # a final newline ends the last line, it opens no blank one
    return [Prompt(_check_text(path, line, f"line {i}", None), f"line {i}")
            for i, line in enumerate(lines, 1)]


def read_prompt_table(path: str | Path, fmt: str, text: str | None, columns: list[str],
                      column_fix: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """A prompt file with more than its prompts: (a table of column `text`, renamed "text", and
    `columns` as read, in file order; where each row is, as "line 3" / "row 3"). `fmt` is
    txt / csv / jsonl / parquet whatever the extension; a txt file has no columns (`text` None,
    `columns` empty). The prompts are checked as read_prompt_file checks them; a cell of
    `columns` is returned as read (CSV: the cell's text), a missing column or key is one
    PromptFileError naming it, with `column_fix[column]` (how the caller's user names another
    column)."""
    path = Path(path)
    suffix = f".{fmt}"
    if suffix not in FORMATS:
        raise PromptFileError(f"{path}: unknown prompt file format {fmt!r}: use one of "
                              f"{', '.join(f.lstrip('.') for f in FORMATS)}")
    if not path.exists():
        raise PromptFileError(f"{path} not found: check the path")
    if not path.is_file():
        raise PromptFileError(f"{path} is not a file: give a {fmt} file of prompts")
    data = path.read_bytes()
    if fmt == "txt":
        prompts = _read_txt(path, _decode(path, data))
        table = pd.DataFrame({"text": [p.text for p in prompts]})
        where = [p.where for p in prompts]
    elif fmt == "jsonl":
        rows, where = [], []
        for i, line in enumerate(_decode(path, data).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{path}: line {i} is not valid JSON ({err.msg}): one "
                                      "JSON object per line") from None
            if not isinstance(obj, dict):
                raise PromptFileError(f"{path}: line {i} is a JSON {type(obj).__name__}, not "
                                      f'an object: write {{"{text}": "..."}} per line')
            for col in [text, *columns]:
                if col not in obj:
                    raise PromptFileError(f"{path}: line {i} has no key {col!r} (it has "
                                          f"{', '.join(map(repr, obj)) or 'none'}): "
                                          f"{column_fix[col]}")
            rows.append({col: obj[col] for col in dict.fromkeys([text, *columns])})
            where.append(f"line {i}")
        table = pd.DataFrame(rows, columns=list(dict.fromkeys([text, *columns])))
    else:
        if fmt == "parquet":
            try:
                df = pd.read_parquet(io.BytesIO(data))
            except (pa.ArrowException, OSError, ValueError) as err:
                raise PromptFileError(f"{path} is not a readable Parquet file ({err}): rewrite "
                                      "it, or use csv / jsonl / txt") from None
        else:
            decoded = _decode(path, data)
            if not decoded.strip():
                raise PromptFileError(f"{path} is empty: write a header row with a {text!r} "
                                      "column, then one prompt per row")
            try:
                # every cell as text: no "nan" for an empty cell, no numbers or dates guessed
                df = pd.read_csv(io.StringIO(decoded), dtype=str, keep_default_na=False)
            except pd.errors.ParserError as err:
                raise PromptFileError(f"{path} is not valid CSV ({err}): quote cells that hold "
                                      "commas or line breaks") from None
        for col in [text, *columns]:
            if col not in df.columns:
                raise _missing_column(path, str(col), [str(c) for c in df.columns],
                                      column_fix[col])
        table = df[list(dict.fromkeys([text, *columns]))].reset_index(drop=True)
        where = [f"row {i}" for i in range(1, len(table) + 1)]
    if fmt != "txt":
        for w, value in zip(where, table[text].tolist(), strict=True):
            _check_text(path, value, w, text)
        table = table.assign(text=table[text]) if text != "text" else table
    if table.empty:
        raise PromptFileError(f"{path} is empty (no prompts): add at least one prompt"
                              + ("" if text is None else f" in column {text!r}"))
    return table, where
