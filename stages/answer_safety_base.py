"""Stage answer_safety_base: the base model unsteered and expert-steered answers the eval prompts.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.answer_safety.
"""

from steerline.pipeline import answer_safety
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(answer_safety.main_base, answer_safety.BaseInputs, answer_safety.BaseOutputs)
