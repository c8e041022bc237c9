"""One model's unjudged eval_safety answers on disk (answer_safety writes, eval_safety reads).

A folder holds:
  answers.parquet  per variant and prompt: variant, prompt_id, text, label, source, answer,
                   n_generated, finished
  nll.parquet      per ungated variant and reference row: variant, prompt_id, nll, n_tokens
  gates.parquet    per gate source and prompt: source, prompt_id, score, fires
  meta.json        model, split, generation, variants (name -> kind, source), plans, steering
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from steerline.core.io import read_json, write_json, write_parquet

PROMPT_COLUMNS = ["prompt_id", "text", "label", "source"]


@dataclass
class ModelAnswers:
    """One model's answers to the eval prompts under each of its variants."""

    answers: pd.DataFrame  # [variants x prompts] rows
    nll: pd.DataFrame  # [ungated variants x reference rows]
    gates: pd.DataFrame  # [sources x prompts]
    meta: dict[str, Any]

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_parquet(self.answers, folder / "answers.parquet")
        write_parquet(self.nll, folder / "nll.parquet")
        write_parquet(self.gates, folder / "gates.parquet")
        write_json(self.meta, folder / "meta.json")

    @classmethod
    def read(cls, folder: Path) -> ModelAnswers:
        if not (folder / "meta.json").is_file():
            raise ValueError(f"{folder} holds no answers (meta.json missing): run the "
                             "answer_safety stages first")
        return cls(*(pd.read_parquet(folder / f"{name}.parquet")
                     for name in ("answers", "nll", "gates")), read_json(folder / "meta.json"))
