"""Stage prepare_safety: data/raw AdvBench + XSTest -> data/prompts/safety.parquet (detect / dev /
test splits, XSTest look-alike pairs kept within one split)."""

from pathlib import Path

from steerline.core.io import write_parquet
from steerline.core.params import load_params
from steerline.steermoe.data.safety import build_safety_prompts

RAW = Path("data/raw")
OUT = Path("data/prompts/safety.parquet")


def main() -> None:
    params = load_params()
    p = params.prepare_safety
    df = build_safety_prompts(
        RAW / "advbench/harmful_behaviors.csv",
        RAW / "xstest/xstest_prompts.csv",
        detect_fraction=p.detect_fraction,
        dev_fraction=p.dev_fraction,
        advbench_max=p.advbench_max,
        seed=params.seed,
    )
    write_parquet(df, OUT, {"seed": str(params.seed), "detect_fraction": str(p.detect_fraction),
                            "dev_fraction": str(p.dev_fraction)})
    counts = df.groupby(["split", "source", "label"]).size()
    print(f"wrote {OUT}: {len(df)} prompts\n{counts.to_string()}")


if __name__ == "__main__":
    from steerline.core.errors import run_stage

    run_stage(main)
