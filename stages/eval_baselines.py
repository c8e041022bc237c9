"""Stage eval_baselines: the unsteered model and the mean-difference baselines on each task.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.eval_baselines.
"""

from steerline.pipeline import eval_baselines
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(eval_baselines.main, eval_baselines.Inputs, eval_baselines.Outputs)
