"""Stage prepare_attributes: raw TruthfulQA, ToxiGen and BBQ -> one attribute table per task.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.prepare_attributes.
"""

from steerline.pipeline import prepare_attributes
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(prepare_attributes.main, prepare_attributes.Inputs, prepare_attributes.Outputs)
