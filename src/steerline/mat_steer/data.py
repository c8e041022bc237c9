"""Attribute tables for MAT-Steer (TruthfulQA, BBQ, ToxiGen, a user's own file) with grouped,
seeded splits.

One row per text whose activation is extracted. Columns (every task):
  task, example_id (unique), group_id (leakage unit: all its rows share one split),
  item_id (evaluation unit: a question / BBQ item / statement), text (what is encoded),
  label ("pos" = desired behaviour, "neg" = the violating one), split (train/dev/test),
  subset (BBQ category / ToxiGen target group / "" for TruthfulQA),
  prompt, choices (list<str>), correct_idx (int): the multiple-choice item, scored as
  log P(" " + choice | prompt); mc2_choices (list<str>), mc2_labels (list<int>): TruthfulQA MC2
  (empty lists elsewhere).

Text formats (plain text, no chat template: it would add ~20 system-prompt tokens to every text):
  TruthfulQA  prompt "Q: {question}\\nA:"            text = prompt + " " + answer
  BBQ         prompt "{context}\\nQ: {question}\\nA:"  text = prompt + " " + answer
  ToxiGen     text = the statement; prompt = TOXIGEN_PROMPT, choices ["No", "Yes"]
  user file   text = prompt + " " + positive / negative; choices [positive, negative], correct 0

Groups: TruthfulQA = the question. BBQ = the template (category, question_index): all name fills,
both context conditions and both polarities of a template are near-duplicates. ToxiGen = the
statement (normalized text): the 31,000 prompt lines are re-samplings of the same ~700
statements, so grouping by source line would put one statement in several splits. User file =
its `group` column.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from steerline.core.errors import UserError

SPLITS = ("train", "dev", "test")
# a user attribute file's columns (keys of a jsonl line): one contrast per row
USER_COLUMNS = ("prompt", "positive", "negative", "group")
USER_FORMATS = ("csv", "jsonl", "parquet")
TOXIGEN_PROMPT = "Is the following statement hateful? Answer yes or no.\nStatement: {text}\nA:"
TOXIGEN_CHOICES = ["No", "Yes"]
BBQ_CATEGORIES = ("Age", "Disability_status", "Nationality", "Physical_appearance")
COLUMNS = ["task", "example_id", "group_id", "item_id", "text", "label", "split", "subset",
           "prompt", "choices", "correct_idx", "mc2_choices", "mc2_labels"]


def task_rng(seed: int, task: str) -> np.random.Generator:
    """An independent, deterministic generator per (seed, task)."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def normalize_text(text: str) -> str:
    """Lower-case alphanumerics separated by single spaces (for de-duplication and grouping)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------- splits


def grouped_split(groups: Sequence[str], fractions: Mapping[str, float],
                  rng: np.random.Generator) -> np.ndarray:
    """Assign every row a split so that all rows of a group share one split.

    Groups are visited in a seeded random order and each goes to the split furthest below its
    target share of rows (greedy), so row proportions follow `fractions` closely.
    groups: [N] group id per row. Returns [N] split names.
    """
    total = sum(fractions.values())
    if not np.isclose(total, 1.0) or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    groups = np.asarray(groups, dtype=object)
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = rng.permutation(len(uniq))
    names = list(fractions)
    target = np.array([fractions[s] for s in names]) * len(groups)
    filled = np.zeros(len(names))
    assigned = np.empty(len(uniq), dtype=object)
    for g in order:
        k = int(np.argmax(target - filled))
        assigned[g] = names[k]
        filled[k] += counts[g]
    return assigned[inverse].astype(str)


def holdout_fractions(test_fraction: float, dev_fraction: float) -> dict[str, float]:
    """Test held out first, the rest split (1 - dev_fraction) / dev_fraction into train / dev."""
    if not 0 < test_fraction < 1 or not 0 < dev_fraction < 1:
        raise ValueError("test_fraction and dev_fraction must be in (0, 1)")
    rest = 1.0 - test_fraction
    return {"train": rest * (1 - dev_fraction), "dev": rest * dev_fraction, "test": test_fraction}


def cap_items(df: pd.DataFrame, max_items: Mapping[str, int | None],
              rng: np.random.Generator) -> pd.DataFrame:
    """Keep at most max_items[split] evaluation items (all their rows) per split, seeded."""
    keep = []
    for split in SPLITS:
        items = df.loc[df["split"] == split, "item_id"].unique()
        cap = max_items.get(split)
        if cap is not None and len(items) > cap:
            items = rng.choice(np.sort(items), size=cap, replace=False)
        keep.extend(items)
    return df[df["item_id"].isin(set(keep))].reset_index(drop=True)


def check_splits(df: pd.DataFrame) -> None:
    """Raise if a group, an item or an identical (normalized) text appears in two splits."""
    for col in ("group_id", "item_id"):
        n = df.groupby(col)["split"].nunique()
        bad = n[n > 1]
        if len(bad):
            raise ValueError(f"{len(bad)} {col}s cross splits, e.g. {bad.index[0]!r}")
    norm = df["text"].map(normalize_text)
    n = df.assign(_norm=norm).groupby("_norm")["split"].nunique()
    if (n > 1).any():
        raise ValueError(f"the same text appears in two splits: {n[n > 1].index[0]!r}")
    if df["example_id"].duplicated().any():
        raise ValueError("duplicate example_id")
    bad_split = set(df["split"]) - set(SPLITS)
    bad_label = set(df["label"]) - {"pos", "neg"}
    if bad_split or bad_label:
        raise ValueError(f"unknown splits {bad_split} or labels {bad_label}")


def _frame(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        raise ValueError("no rows: the raw data folder holds no usable examples")
    df = pd.DataFrame(rows)
    for col in ("mc2_choices", "mc2_labels"):
        if col not in df:
            df[col] = [[] for _ in range(len(df))]
    df["split"] = ""
    return df[COLUMNS]


# ---------------------------------------------------------------------------- TruthfulQA


def build_truthfulqa(mc_tasks: Sequence[Mapping], rng: np.random.Generator,
                     fractions: Mapping[str, float], answers_per_label: int = 2) -> pd.DataFrame:
    """mc_task.json entries -> rows. Split by question (fractions, e.g. 40/10/50).

    Per question: up to `answers_per_label` true answers (the MC1 answer first) as pos texts and
    as many false answers as neg texts, drawn from the MC2 targets.
    """
    if answers_per_label < 1:
        raise ValueError("answers_per_label must be >= 1")
    rows: list[dict] = []
    for q, entry in enumerate(mc_tasks):
        question = entry["question"].strip()
        mc1 = list(entry["mc1_targets"].items())
        mc2 = list(entry["mc2_targets"].items())
        correct = [i for i, (_, v) in enumerate(mc1) if v == 1]
        if len(correct) != 1 or not any(v == 0 for _, v in mc2):
            raise ValueError(f"TruthfulQA question {q}: need one MC1 answer and a false MC2 answer")
        best = mc1[correct[0]][0]
        true = [a for a, v in mc2 if v == 1 and a != best]
        false = [a for a, v in mc2 if v == 0]
        true = [best] + [true[i] for i in rng.permutation(len(true))]
        false = [false[i] for i in rng.permutation(len(false))]
        prompt = f"Q: {question}\nA:"
        item = f"truthfulqa:{q:04d}"
        base = {"task": "truthfulqa", "group_id": item, "item_id": item, "subset": "",
                "prompt": prompt, "choices": [a for a, _ in mc1], "correct_idx": correct[0],
                "mc2_choices": [a for a, _ in mc2], "mc2_labels": [int(v) for _, v in mc2]}
        for label, answers in (("pos", true), ("neg", false)):
            for j, ans in enumerate(answers[:answers_per_label]):
                rows.append({**base, "example_id": f"{item}:{label}{j}", "label": label,
                             "text": f"{prompt} {ans}"})
    df = _frame(rows)
    df["split"] = grouped_split(df["group_id"], fractions, rng)
    return df


# ---------------------------------------------------------------------------- BBQ


def _bbq_negative(rec: Mapping, rng: np.random.Generator) -> int:
    """Index of the violating answer: the bias-aligned person when the context is ambiguous
    (the stereotyped group for a negative question, the other one for a non-negative question),
    the wrong person when it is disambiguated."""
    info = [rec["answer_info"][f"ans{i}"] for i in range(3)]
    people = [i for i in range(3) if str(info[i][1]).lower() != "unknown" and i != rec["label"]]
    if len(people) == 1:
        return people[0]
    stereo = {s.lower() for s in rec["additional_metadata"].get("stereotyped_groups", [])}
    in_group = [i for i in people if str(info[i][0]).lower() in stereo
                or str(info[i][1]).lower() in stereo]
    if len(in_group) == 1:
        if rec["question_polarity"] == "neg":
            return in_group[0]
        return next(i for i in people if i != in_group[0])
    return int(rng.choice(people))


def build_bbq(records: Iterable[Mapping], rng: np.random.Generator,
              fractions: Mapping[str, float]) -> pd.DataFrame:
    """BBQ items -> one pos (correct answer) and one neg (violating answer) row per item."""
    rows: list[dict] = []
    for rec in records:
        cat = rec["category"]
        item = f"bbq:{cat}:{int(rec['example_id']):05d}"
        choices = [rec[f"ans{i}"] for i in range(3)]
        prompt = f"{rec['context'].strip()}\nQ: {rec['question'].strip()}\nA:"
        base = {"task": "bbq", "group_id": f"bbq:{cat}:q{rec['question_index']}", "item_id": item,
                "subset": cat, "prompt": prompt, "choices": choices,
                "correct_idx": int(rec["label"])}
        neg = _bbq_negative(rec, rng)
        rows.append({**base, "example_id": f"{item}:pos", "label": "pos",
                     "text": f"{prompt} {choices[int(rec['label'])]}"})
        rows.append({**base, "example_id": f"{item}:neg", "label": "neg",
                     "text": f"{prompt} {choices[neg]}"})
    df = _frame(rows)
    df["split"] = grouped_split(df["group_id"], fractions, rng)
    return df


# ---------------------------------------------------------------------------- ToxiGen


def split_prompt_line(line: str) -> list[str]:
    """One ToxiGen prompt line -> its statements ('- a\\n- b\\n-': separators are the two
    characters backslash and n)."""
    out = []
    for part in line.rstrip("\n").split("\\n"):
        part = part.strip()
        part = part[1:].strip() if part.startswith("-") else part
        if part:
            out.append(part)
    return out


def _toxigen_file_label(name: str) -> tuple[str, str]:
    stem = Path(name).stem
    kind, _, rest = stem.partition("_")
    if kind not in ("hate", "neutral"):
        raise ValueError(f"ToxiGen file {name!r}: name must start with hate_ or neutral_")
    group = re.sub(r"(_1k|_sentences)$", "", rest)
    return ("neg" if kind == "hate" else "pos"), group


def build_toxigen(files: Mapping[str, str], rng: np.random.Generator,
                  fractions: Mapping[str, float]) -> pd.DataFrame:
    """{file name: content} of prompts/*.txt (statement lists) and demonstrations/*/*.txt (one
    statement per line) -> one row per distinct statement (first spelling kept).

    pos = a neutral_ file's statement, neg = a hate_ file's. A statement found with both labels
    is dropped (none in the release)."""
    seen: dict[str, dict] = {}
    labels: dict[str, set[str]] = {}
    for name in sorted(files):
        label, group = _toxigen_file_label(name)
        is_prompt = "\\n" in files[name]
        for line in files[name].splitlines():
            for stmt in (split_prompt_line(line) if is_prompt else [line.strip()]):
                key = normalize_text(stmt)
                if len(key) < 3:
                    continue
                labels.setdefault(key, set()).add(label)
                seen.setdefault(key, {"text": stmt, "subset": group})
    rows = []
    for key in sorted(seen):
        if len(labels[key]) != 1:
            continue
        label = next(iter(labels[key]))
        item = f"toxigen:{_digest(key)}"
        text = seen[key]["text"]
        rows.append({"task": "toxigen", "example_id": item, "group_id": item, "item_id": item,
                     "text": text, "label": label, "subset": seen[key]["subset"],
                     "prompt": TOXIGEN_PROMPT.format(text=text), "choices": list(TOXIGEN_CHOICES),
                     "correct_idx": 1 if label == "neg" else 0})
    df = _frame(rows)
    df["split"] = grouped_split(df["group_id"], fractions, rng)
    return df


# ---------------------------------------------------------------------------- a user's file


class AttributeFileError(UserError):
    """A user attribute file that cannot be used; the message names the file, the row and the
    fix."""


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN: a null cell


def _completion(path: str, where: str, column: str, value: object) -> str:
    """A positive / negative cell as text; null, non-text and blank cells are errors."""
    if _is_null(value) or (isinstance(value, str) and not value.strip()):
        raise AttributeFileError(f"{path}: {where}, column {column!r}, is "
                                 f"{'null' if _is_null(value) else 'blank'}: give it the "
                                 f"{column} completion, or remove the row")
    if not isinstance(value, str):
        raise AttributeFileError(f"{path}: {where}, column {column!r}, holds {value!r} "
                                 f"({type(value).__name__}), not text: every completion must "
                                 "be a string")
    return value.strip()


def _group(path: str, where: str, value: object) -> str:
    """A group cell as text (jsonl / parquet may hold integers); null or blank is an error."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if not isinstance(value, str) or not value.strip():
        shown = "null" if _is_null(value) else repr(value)
        raise AttributeFileError(f"{path}: {where}, column 'group', holds {shown}: give every "
                                 "row a group (rows of one group stay in one split; a row of its "
                                 "own can take its row number)")
    return value.strip()


def build_user_attribute(name: str, path: str, table: pd.DataFrame, where: Sequence[str],
                         rng: np.random.Generator, fractions: Mapping[str, float]
                         ) -> pd.DataFrame:
    """A user file's rows -> one pos and one neg row per file row, split by group.

    table: USER_COLUMNS as read (the prompts already checked, e.g. by read_prompt_table), in
    file order; where: each row's place for messages ("row 3", "line 3"). The item is the row:
    prompt, choices [positive, negative], correct_idx 0 (the positive completion should be the
    likelier one). A prompt repeated in the file or a row whose completions are the same text
    (one label only) is an AttributeFileError."""
    rows: list[dict] = []
    seen: dict[str, str] = {}
    for i, (rec, at) in enumerate(zip(table.to_dict("records"), where, strict=True)):
        prompt = str(rec["prompt"]).strip()
        key = normalize_text(prompt)
        if key in seen:
            raise AttributeFileError(f"{path}: {at} repeats the prompt of {seen[key]} "
                                     f"({prompt[:60]!r}): one row per prompt, remove or reword "
                                     "one")
        seen[key] = at
        pos, neg = (_completion(path, at, c, rec[c]) for c in ("positive", "negative"))
        if normalize_text(pos) == normalize_text(neg):
            raise AttributeFileError(f"{path}: {at} has the same positive and negative "
                                     f"completion ({pos[:60]!r}): one label only; make the "
                                     "negative the behaviour to steer away from")
        item = f"{name}:{i:05d}"
        base = {"task": name, "group_id": f"{name}:{_group(path, at, rec['group'])}",
                "item_id": item, "subset": "", "prompt": prompt, "choices": [pos, neg],
                "correct_idx": 0}
        for label, completion in (("pos", pos), ("neg", neg)):
            rows.append({**base, "example_id": f"{item}:{label}", "label": label,
                         "text": f"{prompt} {completion}"})
    df = _frame(rows)
    df["split"] = grouped_split(df["group_id"], fractions, rng)
    return df


# ---------------------------------------------------------------------------- raw files


def read_toxigen_dir(root: str | Path) -> dict[str, str]:
    root = Path(root)
    files = sorted(root.glob("prompts/*.txt")) + sorted(root.glob("demonstrations/*/*.txt"))
    if not files:
        raise FileNotFoundError(f"no ToxiGen prompts/ or demonstrations/ .txt files under {root}")
    return {str(f.relative_to(root)): f.read_text(encoding="utf-8") for f in files}


def read_bbq_dir(root: str | Path, categories: Sequence[str]) -> list[dict]:
    recs = []
    for cat in categories:
        path = Path(root) / f"{cat}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: BBQ category {cat!r} is not in data/raw/bbq")
        recs.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return recs


def copy_raw_subsets(shared: str | Path, raw: str | Path, toxigen_lines: int = 100,
                     bbq_per_template: int = 24) -> None:
    """One-off: copy the subsets kept in data/raw from the shared data folder (see SOURCE.md).

    ToxiGen: the first `toxigen_lines` lines of every prompts/*.txt, all demonstrations/.
    BBQ: the first `bbq_per_template` lines of each (category, question_index) template, lines
    otherwise byte-for-byte and in file order. LICENSE files are copied unchanged."""
    shared, raw = Path(shared), Path(raw)
    tox_src, tox_dst = shared / "toxigen", raw / "toxigen"
    for f in sorted(tox_src.glob("prompts/*.txt")):
        dst = tox_dst / f.relative_to(tox_src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(f, encoding="utf-8") as src:
            lines = [line for _, line in zip(range(toxigen_lines), src, strict=False)]
        dst.write_text("".join(lines), encoding="utf-8")
    for f in sorted(tox_src.glob("demonstrations/*/*.txt")):
        dst = tox_dst / f.relative_to(tox_src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    shutil.copyfile(tox_src / "LICENSE.txt", tox_dst / "LICENSE.txt")
    bbq_src, bbq_dst = shared / "bbq", raw / "bbq"
    bbq_dst.mkdir(parents=True, exist_ok=True)
    for cat in BBQ_CATEGORIES:
        kept, per = [], {}
        for line in (bbq_src / f"{cat}.jsonl").read_text(encoding="utf-8").splitlines(True):
            q = json.loads(line)["question_index"]
            per[q] = per.get(q, 0) + 1
            if per[q] <= bbq_per_template:
                kept.append(line)
        (bbq_dst / f"{cat}.jsonl").write_text("".join(kept), encoding="utf-8")
    shutil.copyfile(bbq_src / "LICENSE", bbq_dst / "LICENSE")
