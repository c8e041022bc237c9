"""The safety evaluation: variants answering the same prompts, the refusal judge, rates, paired
tests against each variant's reference, goals and figures.
"""
