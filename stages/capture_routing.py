"""Stage capture_routing: an MoE + the detect-split prompts -> per-token routing and greedy answers.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.capture_routing.
"""

from steerline.pipeline import capture_routing
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(capture_routing.main, capture_routing.Inputs, capture_routing.Outputs)
