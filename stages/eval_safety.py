"""Stage eval_safety: both models' answers (answer_safety_base / _finetuned) judged and compared.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.eval_safety.
"""

from steerline.pipeline import eval_safety
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(eval_safety.main, eval_safety.Inputs, eval_safety.Outputs)
