"""The SteerMoE original's paired-chat files (JACKPURCELL/SteerMoE, demo.py / custom_steering):
one row per pair of chats that show opposite behaviours, read as two labelled prompts.

A row has four keys (jsonl: one JSON object per line; parquet: columns), the original's names:

- `messages_0`, `messages_1`: each a chat, a list of {"role": ..., "content": ...} messages
  (roles system / user / assistant), typically the same request with a safe and an unsafe
  answer;
- `messages_0_target`, `messages_1_target`: the text in that chat whose tokens are compared
  (the original's "target string": which tokens' routings are compared), usually the answer.

As in the original, each chat is run teacher-forced, in one prefill (no generation), and the
routing of its target span's tokens is what risk_diff's `target` scope counts. The original
finds the span as the last occurrence of the target's own token ids in the chat's ids (and fails
when a boundary token merges differently in context); here it is the last occurrence of the
target's text in the chat's last message that holds it, and its tokens are those with a
character in that span (steerline.core.chat.render_target_chat), so the same span is found
however the tokenizer merges its edges.

A row's messages_0 chat takes the source's label (or the row's label_column cell), its
messages_1 chat the other one: a pair is one unsafe and one safe chat. Every way a file can be
unusable is one PromptFileError naming the file, the line (jsonl) or data row (parquet) and the
fix, raised before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from steerline.core.chat import is_blank
from steerline.core.prompt_table import PromptFileError, read_prompt_table

CHAT_KEYS = ("messages_0", "messages_1")
TARGET_KEYS = ("messages_0_target", "messages_1_target")
ROLES = ("system", "user", "assistant")
#: the file formats a paired-chat file can be (a chat is a list of messages: no csv / txt)
FILE_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
OTHER_LABEL = {"unsafe": "safe", "safe": "unsafe"}
_KEY_FIX = ("a paired-chat row needs messages_0, messages_1 (chats) and messages_0_target, "
            "messages_1_target (the text of each chat whose tokens are compared)")


@dataclass(frozen=True)
class PairedRow:
    """One row of a paired-chat file: two chats, their targets, each chat's request text."""

    where: str  # "line 3" / "row 3"
    chats: tuple[list[dict[str, str]], list[dict[str, str]]]
    targets: tuple[str, str]
    texts: tuple[str, str]  # each chat's last user message: the prompt other stages read


def chat_json(chat: list[dict[str, str]]) -> str:
    """A chat as the table stores it: JSON, keys in (role, content) order, text as written."""
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in chat],
                      ensure_ascii=False)


def file_format(path: Path) -> str:
    fmt = FILE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise PromptFileError(f"{path}: a paired-chat file is .jsonl or .parquet (a chat is a "
                              f"list of messages), not {Path(path).suffix or '(none)'!r}: write "
                              "one JSON object per line (pandas: to_json(orient='records', "
                              "lines=True)) or a Parquet file")
    return fmt


def _chat(path: Path, where: str, key: str, value: object) -> list[dict[str, str]]:
    at = f"{path}: {where}, {key},"
    if isinstance(value, np.ndarray):  # parquet: a list column reads as an array
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise PromptFileError(f"{at} is {type(value).__name__} {str(value)[:40]!r}, not a chat: "
                              'give a non-empty list of {"role": ..., "content": ...} messages')
    chat = []
    for k, msg in enumerate(value, 1):
        if not isinstance(msg, dict):
            raise PromptFileError(f"{at} message {k} is {type(msg).__name__}, not an object: "
                                  'write {"role": ..., "content": ...}')
        # parquet unifies the struct fields of every row: a key another row has reads as null
        extra = sorted(str(x) for x, v in msg.items() if x not in ("role", "content")
                       and v is not None)
        if extra:
            raise PromptFileError(f"{at} message {k} has key {extra[0]!r}: a message is role "
                                  "and content only; drop the key")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise PromptFileError(f"{at} message {k} has role {role!r}: use one of "
                                  f"{', '.join(ROLES)}")
        if not isinstance(content, str) or is_blank(content):
            raise PromptFileError(f"{at} message {k} ({role}) has no text (content "
                                  f"{content!r}): give it text or drop the message")
        chat.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in chat):
        raise PromptFileError(f"{at} has no user message: a chat needs the user's request (the "
                              "prompt the other stages read)")
    return chat


def read_paired_rows(path: str | Path, fmt: str, columns: list[str],
                     column_fix: dict[str, str]) -> tuple[pd.DataFrame, list[PairedRow]]:
    """The rows of a paired-chat file (`fmt` jsonl or parquet) as PairedRow, and the cells of
    `columns` (the caller's: label, group, stratum, prompt_id fields) as read, in file order."""
    path = Path(path)
    if fmt not in FILE_FORMATS.values():
        raise PromptFileError(f"{path}: a paired-chat file is jsonl or parquet, not {fmt!r}")
    fixes = {**{k: _KEY_FIX for k in (*TARGET_KEYS, *CHAT_KEYS)}, **column_fix}
    # the first target is read as the table's text column: read_prompt_table checks it is a
    # non-blank string like a prompt (the file, the row, what to give)
    table, where = read_prompt_table(path, fmt, TARGET_KEYS[0],
                                     [TARGET_KEYS[1], *CHAT_KEYS, *columns], fixes)
    rows: list[PairedRow] = []
    seen: dict[str, tuple[str, int]] = {}
    for i, w in enumerate(where):
        chats, targets, texts = [], [], []
        for side, (ckey, tkey) in enumerate(zip(CHAT_KEYS, TARGET_KEYS, strict=True)):
            chat = _chat(path, w, ckey, table[ckey].iloc[i])
            target = table["text"].iloc[i] if side == 0 else table[tkey].iloc[i]
            if not isinstance(target, str) or is_blank(target):
                raise PromptFileError(f"{path}: {w}, {tkey}, is {target!r}: give the text of "
                                      f"{ckey} whose tokens are compared")
            if not any(target in m["content"] for m in chat):
                raise PromptFileError(f"{path}: {w}, {tkey} ({target[:40]!r}) is in no message "
                                      f"of {ckey}: copy the span from the chat's text exactly")
            key = chat_json(chat) + "\x00" + target
            if key in seen:
                first, first_side = seen[key]
                same = ("carries both labels (messages_0 and messages_1 are the two labels)"
                        if first_side != side else "is counted once")
                raise PromptFileError(f"{path}: {w}, {ckey}, repeats {first}'s "
                                      f"{CHAT_KEYS[first_side]} (the same chat and target): a "
                                      f"chat {same}; remove the duplicate")
            seen[key] = (w, side)
            chats.append(chat)
            targets.append(target)
            texts.append(next(m["content"] for m in reversed(chat) if m["role"] == "user"))
        rows.append(PairedRow(w, (chats[0], chats[1]), (targets[0], targets[1]),
                              (texts[0], texts[1])))
    return table, rows


def paired_prompts(path: str | Path, first_label: str) -> pd.DataFrame:
    """`steerline detect --paired`: the prompt table of one paired-chat file, prompt_id
    `pair-{row:05d}-{0|1}`, text (each chat's last user message), label (messages_0:
    `first_label`, messages_1: the other), source (the file), messages (the chat, JSON) and
    target: the shape run_capture reads."""
    path = Path(path)
    if first_label not in OTHER_LABEL:
        raise PromptFileError(f"the label of messages_0 must be unsafe or safe, got "
                              f"{first_label!r}")
    _, rows = read_paired_rows(path, file_format(path), [], {})
    labels = (first_label, OTHER_LABEL[first_label])
    out = [{"prompt_id": f"pair-{i:05d}-{side}", "text": r.texts[side], "label": labels[side],
            "source": str(path), "messages": chat_json(r.chats[side]), "target": r.targets[side]}
           for i, r in enumerate(rows) for side in (0, 1)]
    return pd.DataFrame(out, columns=["prompt_id", "text", "label", "source", "messages",
                                      "target"])
