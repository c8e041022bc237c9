"""Stage prepare_safety: AdvBench + XSTest -> the safety prompts with detect / dev / test splits
(XSTest look-alike pairs kept within one split)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from steerline.core.io import write_parquet
from steerline.core.params import Params
from steerline.steermoe.data.safety import build_safety_prompts


@dataclass(frozen=True)
class Inputs:
    advbench: Path  # harmful_behaviors.csv
    xstest: Path  # xstest_prompts.csv


@dataclass(frozen=True)
class Outputs:
    prompts: Path  # safety.parquet


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    p = params.prepare_safety
    df = build_safety_prompts(
        inputs.advbench,
        inputs.xstest,
        detect_fraction=p.detect_fraction,
        dev_fraction=p.dev_fraction,
        advbench_max=p.advbench_max,
        seed=params.seed,
    )
    write_parquet(df, out.prompts, {"seed": str(params.seed),
                                    "detect_fraction": str(p.detect_fraction),
                                    "dev_fraction": str(p.dev_fraction)})
    counts = df.groupby(["split", "source", "label"]).size()
    print(f"wrote {out.prompts}: {len(df)} prompts\n{counts.to_string()}")
