"""Stage build_models: the wheel's GGUF -> the dense model and its MoEfied MoE, fidelity metrics.

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.build_models.
"""

from steerline.pipeline import build_models
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(build_models.main, build_models.Inputs, build_models.Outputs)
