"""Stage finetune_experts: the MoE + its unsafe experts + refusal SFT data -> the fine-tuned MoE.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.finetune_experts.
"""

from steerline.pipeline import finetune_experts
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(finetune_experts.main, finetune_experts.Inputs, finetune_experts.Outputs)
