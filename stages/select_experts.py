"""Stage select_experts: the risk-difference table -> the selected experts (experts.json).

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.select_experts.
"""

from steerline.pipeline import select_experts
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(select_experts.main, select_experts.Inputs, select_experts.Outputs)
