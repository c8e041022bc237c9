"""Stage train_steering: activations -> the trained MAT-Steer module and its dvclive curves.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.train_steering.
"""

from steerline.pipeline import train_steering
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(train_steering.main, train_steering.Inputs, train_steering.Outputs)
