"""The safety evaluation's prompts: one split of the safety prompts (test by default, read once;
dev for choosing params; never the detect split used for detection and training), every unsafe
and every safe source by label (by default AdvBench + XSTest's unsafe contrasts; XSTest's safe
look-alikes, Alpaca's held-out instructions and the imperative benign requests; a user's own
sources the same way), each reported per source.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

SPLITS = ("dev", "test")


def select_eval_prompts(
    prompts: pd.DataFrame, max_unsafe: int | None, max_safe: int | None, seed: int,
    split: str = "test", source_order: Sequence[str] = (),
) -> pd.DataFrame:
    """Prompts of one split (dev or test), seeded, sorted by prompt_id: the unsafe ones (every
    source, `max_unsafe` in all, in proportion to each source's size) and the safe ones (each
    source at most `max_safe`, drawn in `source_order`, then any other source by name; one
    generator, so a source listed last leaves the others' draws as they were)."""
    if split not in SPLITS:
        raise ValueError(f"evaluation split must be one of {SPLITS}, got {split!r}")
    for col in ("prompt_id", "text", "label", "source", "split"):
        if col not in prompts.columns:
            raise ValueError(f"safety prompts have no column {col!r}: rerun prepare_safety")
    test = prompts[prompts["split"] == split]
    unsafe = test[test["label"] == "unsafe"].sort_values("prompt_id")
    safe = test[test["label"] == "safe"].sort_values("prompt_id")
    if unsafe.empty or safe.empty:
        raise ValueError(f"the {split} split has no {'unsafe' if unsafe.empty else 'safe'} "
                         "prompt to evaluate: give prepare_safety a source of them with a share "
                         "of this split (split null or this split)")
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
    listed = [s for s in source_order if s in set(safe["source"])]
    for src in listed + sorted(set(safe["source"]) - set(listed)):
        grp = safe[safe["source"] == src]
        if max_safe is not None and len(grp) > max_safe:
            grp = grp.iloc[np.sort(rng.choice(len(grp), max_safe, replace=False))]
        parts.append(grp)
    out = pd.concat(parts, ignore_index=True)
    return out[["prompt_id", "text", "label", "source"]].sort_values("prompt_id").reset_index(
        drop=True)
