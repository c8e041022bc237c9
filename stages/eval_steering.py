"""Stage eval_steering: base vs mean-difference vs MAT-Steer on each task's test split.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.eval_steering.
"""

from steerline.pipeline import eval_steering
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(eval_steering.main, eval_steering.Inputs, eval_steering.Outputs)
