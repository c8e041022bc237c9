"""The pipeline: one module per DVC stage, the only layer that reads the params; each `main(params,
inputs, outputs)` wires the methods to the backends (stages/*.py call it with the paths from
dvc.yaml).
"""
