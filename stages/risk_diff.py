"""Stage risk_diff: routing + prompts -> the per-(layer, expert) risk-difference table and plots.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.risk_diff.
"""

from steerline.pipeline import risk_diff
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(risk_diff.main, risk_diff.Inputs, risk_diff.Outputs)
