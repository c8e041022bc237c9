"""Stage prepare_safety: the prompt files of params.yaml's prepare_safety.sources (AdvBench +
XSTest by default) -> the safety prompts with detect / dev / test splits (look-alike pairs and
groups kept within one split)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from steerline.core.errors import UserError
from steerline.core.io import write_parquet
from steerline.core.params import Params, load_yaml
from steerline.steermoe.data.safety_sources import SafetySource
from steerline.steermoe.data.safety_table import build_safety_prompts

STAGE = "prepare_safety"


@dataclass(frozen=True)
class Inputs:
    """None on the command line: the source files are params (prepare_safety.sources), each a
    dep in dvc.yaml as ${prepare_safety.sources[i].path}."""


@dataclass(frozen=True)
class Outputs:
    prompts: Path  # safety.parquet


def source_dep(index: int) -> str:
    """dvc.yaml's dep line for source `index` (DVC resolves it to the source's path; a whole
    list cannot be interpolated into deps, an indexed key can)."""
    return f"${{{STAGE}.sources[{index}].path}}"


def check_sources_are_deps(n_sources: int, dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Under `dvc repro` (DVC sets DVC_STAGE), every source must be a dep of the stage: else a
    later edit of that file would leave the table stale with `dvc status` clean."""
    if os.environ.get("DVC_STAGE") != STAGE or not dvc_yaml.is_file():
        return
    deps = load_yaml(dvc_yaml)["stages"][STAGE].get("deps", [])
    missing = [i for i in range(n_sources) if source_dep(i) not in deps]
    if missing:
        raise UserError(f"prepare_safety.sources[{missing[0]}] is not a dep of {STAGE} in "
                        f"{dvc_yaml} ({source_dep(missing[0])}): run `python -m "
                        "tools.sync_stage_deps`, then dvc repro")


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    p = params.prepare_safety
    check_sources_are_deps(len(p.sources))
    sources = [SafetySource(**{**s.model_dump(), "path": Path(s.path)}) for s in p.sources]
    df = build_safety_prompts(sources, detect_fraction=p.detect_fraction,
                              dev_fraction=p.dev_fraction, seed=params.data_seed)
    # the metadata the table has always had: the sources are params, dvc.lock records them
    write_parquet(df, out.prompts, {"data_seed": str(params.data_seed),
                                    "detect_fraction": str(p.detect_fraction),
                                    "dev_fraction": str(p.dev_fraction)})
    counts = df.groupby(["split", "source", "label"]).size()
    print(f"wrote {out.prompts}: {len(df)} prompts\n{counts.to_string()}")
