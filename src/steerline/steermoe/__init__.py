"""SteerMoE: safety prompts, routing capture, risk difference, expert selection, expert steering,
selective expert finetuning and the safety evaluation."""
