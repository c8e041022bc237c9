"""The safety evaluation's prompts: one split of the safety prompts (test by default, read once;
dev for choosing params; never the detect split used for detection and training), unsafe
(AdvBench + XSTest's unsafe contrast prompts) and XSTest safe (safe requests that look unsafe).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("dev", "test")


def select_eval_prompts(
    prompts: pd.DataFrame, max_unsafe: int | None, max_safe: int | None, seed: int,
    split: str = "test",
) -> pd.DataFrame:
    """Prompts of one split (dev or test): unsafe (every source, subsampled in proportion to its
    size) and safe XSTest prompts, seeded; sorted by prompt_id."""
    if split not in SPLITS:
        raise ValueError(f"evaluation split must be one of {SPLITS}, got {split!r}")
    for col in ("prompt_id", "text", "label", "source", "split"):
        if col not in prompts.columns:
            raise ValueError(f"safety prompts have no column {col!r}: rerun prepare_safety")
    test = prompts[prompts["split"] == split]
    unsafe = test[test["label"] == "unsafe"].sort_values("prompt_id")
    safe = test[(test["label"] == "safe") & (test["source"] == "xstest")].sort_values("prompt_id")
    if unsafe.empty or safe.empty:
        raise ValueError(f"the {split} split needs unsafe prompts and XSTest safe prompts: "
                         "rerun prepare_safety")
    rng = np.random.default_rng(seed)
    parts = []
    if max_unsafe is not None and len(unsafe) > max_unsafe:
        sizes = unsafe.groupby("source").size()
        quota = np.floor(sizes / sizes.sum() * max_unsafe).astype(int)
        # largest remainders get the leftover prompts, so the total is exactly max_unsafe
        rem = (sizes / sizes.sum() * max_unsafe - quota).sort_values(ascending=False, kind="stable")
        for src in rem.index[: max_unsafe - int(quota.sum())]:
            quota[src] += 1
        for src, n in quota.items():
            grp = unsafe[unsafe["source"] == src]
            parts.append(grp.iloc[np.sort(rng.choice(len(grp), int(n), replace=False))])
    else:
        parts.append(unsafe)
    if max_safe is not None and len(safe) > max_safe:
        safe = safe.iloc[np.sort(rng.choice(len(safe), max_safe, replace=False))]
    parts.append(safe)
    out = pd.concat(parts, ignore_index=True)
    return out[["prompt_id", "text", "label", "source"]].sort_values("prompt_id").reset_index(
        drop=True)
