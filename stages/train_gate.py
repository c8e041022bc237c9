"""Stage train_gate: one model's prompt gates (routing, residual), fit on detect, chosen on dev.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.train_gate.
"""

from steerline.pipeline import train_gate
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(train_gate.main, train_gate.Inputs, train_gate.Outputs)
