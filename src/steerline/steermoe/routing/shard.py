"""One capture shard: a backend's greedy answers and routing for a slice of the prompts, written
as a routing shard and a generations file (the one code path of every capture, in-process or in
a data-parallel worker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

from steerline.backends import Backend
from steerline.core.chat import ChatPrompt, TargetChat
from steerline.core.io import write_parquet, write_table
from steerline.steering.capture import Routed
from steerline.steermoe.routing.schema import META_TARGET, routing_table

GEN_COLUMNS = ["prompt_id", "label", "answer", "n_prompt_tokens", "n_generated_tokens", "finished"]


def target_mask(chats: list[ChatPrompt], routed: list[Routed]) -> np.ndarray:
    """[tokens] bool over the shard's rows: each TargetChat's target span (its prompt tokens;
    it has no answer), False for every other token."""
    out = []
    for c, r in zip(chats, routed, strict=True):
        if isinstance(c, TargetChat):
            if r.n_generated or list(r.token_ids[: r.n_prompt]) != list(c.ids):
                raise RuntimeError("a teacher-forced chat came back with other tokens than it "
                                   "was given: its target span cannot be placed")
            out.append(np.asarray(c.is_target, dtype=bool))
        else:
            out.append(np.zeros(len(r.token_ids), dtype=bool))
    return np.concatenate(out)


def shard_table(routed: list[Routed], ids: list[str], labels: list[str],
                is_target: np.ndarray | None = None):
    """One routing shard (pyarrow Table, contract schema) from per-prompt captures; with
    `is_target` (target_mask), the paired-chat schema."""
    n = [len(r.token_ids) for r in routed]
    return routing_table(
        prompt_id=np.repeat(np.asarray(ids, dtype=object), n).tolist(),
        label=np.repeat(np.asarray(labels, dtype=object), n).tolist(),
        position=np.concatenate([np.arange(k, dtype=np.int32) for k in n]),
        token_id=np.concatenate([r.token_ids for r in routed]),
        is_generated=np.concatenate([r.is_generated for r in routed]),
        is_template=np.concatenate([r.is_template for r in routed]),
        experts=np.concatenate([r.experts for r in routed]),
        weights=np.concatenate([r.weights for r in routed]),
        is_target=is_target,
    )


def generations_frame(
    routed: list[Routed], ids: list[str], labels: list[str], tokenizer: PreTrainedTokenizerBase
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": ids,
            "label": labels,
            "answer": [
                tokenizer.decode(r.token_ids[r.n_prompt :], skip_special_tokens=True)
                for r in routed
            ],
            "n_prompt_tokens": [r.n_prompt for r in routed],
            "n_generated_tokens": [r.n_generated for r in routed],
            "finished": [r.finished for r in routed],
        }
    )[GEN_COLUMNS]


def shard_done(work: Path, k: int) -> bool:
    return (work / f"shard-{k:05d}.parquet").exists() and (work / f"gen-{k:05d}.parquet").exists()


def capture_shard(backend: Backend, tokenizer: PreTrainedTokenizerBase, chats: list[ChatPrompt],
                  ids: list[str], labels: list[str], max_new_tokens: int,
                  shard_meta: dict[str, str], work: Path, k: int) -> None:
    """Shard k: one generate_and_capture call over its prompts, then its generations and its
    routing (atomic writes, the routing last: both present = the shard is done). The one code
    path of every capture, in-process or in a data-parallel worker (capture_dp). A capture of
    paired chats (shard_meta META_TARGET) runs its TargetChats teacher-forced (0 new tokens: a
    prefill of the whole chat) and writes the is_target column in every shard."""
    if META_TARGET not in shard_meta:
        routed = backend.generate_and_capture(chats, max_new_tokens)
        is_target = None
    else:
        forced = [i for i, c in enumerate(chats) if isinstance(c, TargetChat)]
        free = [i for i, c in enumerate(chats) if not isinstance(c, TargetChat)]
        got: list[Routed | None] = [None] * len(chats)
        for idx, n_new in ((free, max_new_tokens), (forced, 0)):
            if idx:
                for i, r in zip(idx, backend.generate_and_capture([chats[i] for i in idx], n_new),
                                strict=True):
                    got[i] = r
        routed = [r for r in got if r is not None]
        is_target = target_mask(chats, routed)
    write_parquet(generations_frame(routed, ids, labels, tokenizer), work / f"gen-{k:05d}.parquet")
    write_table(shard_table(routed, ids, labels, is_target), work / f"shard-{k:05d}.parquet",
                shard_meta)
