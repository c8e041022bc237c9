"""MAT-Steer: gated multi-attribute steering vectors for a model's residual stream.

Modules: `data` (attribute tables and grouped splits), `activations` (residual-stream capture),
`checkpoint` (the trained module's safetensors checkpoint, and applying it to a model), `losses`
(the four training losses, batched over attributes), `train` (the training loop), `probe` and
`diagnostics` (gate probes, AUROC, MMD), `evaluate` (log-likelihood scoring), `report` (the
comparisons) and `generate` (text generation with the steering applied). The gated module itself
and the hooks that apply it are in steerline.steering (gated, residual).
"""
