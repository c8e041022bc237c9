"""One-off: rebuild the ToxiGen, BBQ and Alpaca subsets kept in data/raw from the full copies in a
shared data folder (data/raw/{toxigen,bbq,alpaca}/SOURCE.md). Usage:

    python scripts/copy_raw_subsets.py [SHARED (../shared/data)] [RAW (data/raw)]
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

from steerline.mat_steer.datasets import BBQ_CATEGORIES


def copy_raw_subsets(shared: str | Path, raw: str | Path, toxigen_lines: int = 100,
                     bbq_per_template: int = 24, alpaca_rows: int = 600) -> None:
    """Copy the subsets kept in data/raw from the shared data folder (see SOURCE.md).

    ToxiGen: the first `toxigen_lines` lines of every prompts/*.txt, all demonstrations/.
    BBQ: the first `bbq_per_template` lines of each (category, question_index) template, lines
    otherwise byte-for-byte and in file order. Alpaca: `alpaca_rows` instructions drawn without
    replacement (random.Random(0).sample), kept in file order, as JSON lines. LICENSE files
    are copied unchanged."""
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
    alp_src, alp_dst = shared / "alpaca", raw / "alpaca"
    alp_dst.mkdir(parents=True, exist_ok=True)
    rows = json.loads((alp_src / "alpaca_instructions.json").read_text(encoding="utf-8"))
    keep = sorted(random.Random(0).sample(range(len(rows)), alpaca_rows))
    # JSON lines: prepare_safety reads .jsonl (one object per line), not a JSON list
    (alp_dst / "alpaca_instructions.jsonl").write_text(
        "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in keep), encoding="utf-8")
    for name in ("DATA_LICENSE", "LICENSE.refusal_direction"):
        shutil.copyfile(alp_src / name, alp_dst / name)


def main() -> None:
    copy_raw_subsets(sys.argv[1] if len(sys.argv) > 1 else "../shared/data",
                     sys.argv[2] if len(sys.argv) > 2 else "data/raw")


if __name__ == "__main__":
    main()
