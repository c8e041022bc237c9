"""Stage answer_safety_finetuned: the fine-tuned model, unsteered and steered by its own unsafe
experts, answers the eval prompts.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.answer_safety.
"""

from steerline.pipeline import answer_safety
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(answer_safety.main_finetuned, answer_safety.FinetunedInputs,
              answer_safety.FinetunedOutputs)
