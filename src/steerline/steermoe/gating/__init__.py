"""Prompt gates for targeted expert steering: decide from a prompt's own prefill whether its
request is steered (features.py: what the gate reads; prompt_gate.py: the gate, its fit and
files; scoring.py: gates applied to a model's prompts)."""
