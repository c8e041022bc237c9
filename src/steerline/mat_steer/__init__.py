"""MAT-Steer: gated multi-attribute steering vectors for a model's residual stream.

Modules: `data` (attribute tables and grouped splits), `activations` (residual-stream capture),
`module` (the gated steering module and its safetensors checkpoint), `losses` (the four training
losses, batched over attributes), `train` (the training loop), `hooks` (runtime steering hooks
that are always removed), `evaluate` (log-likelihood scoring and gate diagnostics) and
`generate` (text generation with the steering applied, library + CLI).
"""
