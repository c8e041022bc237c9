"""Stage extract_activations: the dense model + attribute tables -> residual-stream activations.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.extract_activations.
"""

from steerline.pipeline import extract_activations
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(extract_activations.main, extract_activations.Inputs, extract_activations.Outputs)
