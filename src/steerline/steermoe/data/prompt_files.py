"""A researcher's own prompt files -> a labelled prompt table (prompt_id, text, label, source).

Formats, by extension: `.txt` (one prompt per line), `.csv`, `.jsonl` (one JSON object per line)
and `.parquet`, the last three with the prompts in a text column (`text` unless told). Every way a
file can be unusable is one PromptFileError (a UserError: one line, no traceback) that names the
file, the line or row, and the fix, raised before anything is generated or written:
a missing, unknown-format or empty file, a missing column, a blank, null or non-string prompt, a
prompt repeated within a file, text that is not UTF-8, and one label only (the same file given
for both labels, or a prompt present in both files: risk difference compares the two labels).

Where a prompt is: `.txt` and `.jsonl` by line (1-based, as an editor shows it), `.csv` and
`.parquet` by data row (1-based, the CSV header not counted: a quoted cell may span lines).

The file reading and its checks are steerline.core.prompt_table's (shared with MAT-Steer's user
attribute files); this module adds the one-prompt-per-row rules and the two labels.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from steerline.core.prompt_table import FORMATS, Prompt, PromptFileError, read_prompt_table

LABEL_PREFIX = {"unsafe": "unsafe", "safe": "safe"}  # prompt_id = f"{prefix}-{index:05d}"


def read_prompt_file(path: str | Path, column: str = "text",
                     column_fix: str = "name the column that holds the prompts") -> list[Prompt]:
    """The prompts of one file, in file order, each checked (see the module docstring).
    `column_fix`: how the caller's user names another column (e.g. a command-line flag)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PromptFileError(f"{path}: unknown prompt file format {path.suffix or '(none)'!r}: "
                              f"use one of {', '.join(FORMATS)}")
    table, where = read_prompt_table(path, suffix[1:], None if suffix == ".txt" else column, [],
                                     {column: column_fix})
    prompts = [Prompt(t, w) for t, w in zip(table["text"].tolist(), where, strict=True)]
    seen: dict[str, str] = {}
    for p in prompts:
        key = p.text.strip()
        if key in seen:
            raise PromptFileError(f"{path}: {p.where} repeats {seen[key]} ({key[:60]!r}): "
                                  "remove the duplicate (a prompt counts once)")
        seen[key] = p.where
    return prompts


def labelled_prompts(unsafe: str | Path, safe: str | Path, column: str = "text",
                     column_fix: str = "name the column that holds the prompts") -> pd.DataFrame:
    """The prompt table of an unsafe and a safe prompt file: prompt_id (`unsafe-00000`, ... in
    file order), text, label, source (the file's path), the shape capture_routing reads."""
    unsafe, safe = Path(unsafe), Path(safe)
    if unsafe.exists() and safe.exists() and unsafe.resolve() == safe.resolve():
        raise PromptFileError(f"{unsafe} is given as both the unsafe and the safe prompts: a risk "
                              "difference needs two files, one per label")
    sides = {"unsafe": read_prompt_file(unsafe, column, column_fix),
             "safe": read_prompt_file(safe, column, column_fix)}
    in_unsafe = {p.text.strip(): p.where for p in sides["unsafe"]}
    for p in sides["safe"]:
        other = in_unsafe.get(p.text.strip())
        if other is not None:
            raise PromptFileError(
                f"{safe}: {p.where} is also in {unsafe} ({other}: {p.text.strip()[:60]!r}): a "
                "prompt carries one label; remove it from one of the files"
            )
    rows = [
        {"prompt_id": f"{LABEL_PREFIX[label]}-{i:05d}", "text": p.text, "label": label,
         "source": str(path)}
        for label, path in (("unsafe", unsafe), ("safe", safe))
        for i, p in enumerate(sides[label])
    ]
    return pd.DataFrame(rows, columns=["prompt_id", "text", "label", "source"])
