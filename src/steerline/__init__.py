"""steerline: reproducible steering of language models (SteerMoE, MAT-Steer) as a DVC pipeline."""

from steerline import numerics

# Before numpy / torch / scikit-learn / vLLM load (every entry point imports steerline first):
# they read the contract's variables when they load (steerline.numerics).
numerics.pin()

__version__ = "0.1.0"
