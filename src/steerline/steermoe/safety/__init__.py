"""The safety evaluation: variants answering the same prompts, the refusal judge, rates and paired
tests.
"""
