"""steerline: reproducible steering of language models (SteerMoE, MAT-Steer) as a DVC pipeline."""

__version__ = "0.1.0"
