"""Stage prepare_safety: AdvBench + XSTest -> the safety prompts with detect / dev / test splits.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.prepare_safety.
"""

from steerline.pipeline import prepare_safety
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(prepare_safety.main, prepare_safety.Inputs, prepare_safety.Outputs)
