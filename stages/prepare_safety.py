"""Stage prepare_safety: params.yaml's prepare_safety.sources -> the safety prompts with splits.

The output path comes from dvc.yaml's cmd, the source files from params; the work is
steerline.pipeline.prepare_safety.
"""

from steerline.pipeline import prepare_safety
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(prepare_safety.main, prepare_safety.Inputs, prepare_safety.Outputs)
