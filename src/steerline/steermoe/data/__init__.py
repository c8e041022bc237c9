"""Safety prompts (AdvBench, XSTest) with their splits, refusal SFT examples and the contrasts
(pooled, style-matched) risk_diff compares.
"""
