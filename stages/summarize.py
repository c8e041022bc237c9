"""Stage summarize: the reports -> reports/summary.json, the numbers the docs show that no other
stage writes (dev-sweep picks, style weight, MAT-Steer goal margins, changed items).

Paths come from dvc.yaml's cmd; the work is steerline.pipeline.summarize.
"""

from steerline.pipeline import summarize
from steerline.pipeline.stage import stage_cli

if __name__ == "__main__":
    stage_cli(summarize.main, summarize.Inputs, summarize.Outputs)
