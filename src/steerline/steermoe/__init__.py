"""SteerMoE: safety prompts (data/), routing capture (routing/), risk difference and expert
selection (detection/), selective expert finetuning (finetuning/) and the safety evaluation
(safety/). The expert steering plans and router edit are in steerline.steering.experts.
"""
