"""SFT data for selective expert finetuning (SteerMoE).

`build_sft_examples`: the detection-split unsafe prompts paired with a refusal (one of
`REFUSAL_TEMPLATES`, chosen per prompt by a seeded hash, so the choice is deterministic and
independent of row order), plus detection-split safe prompts paired with the model's own greedy
answers from capture_routing (data/generations.parquet), so helpfulness on benign requests is
kept. Each example is the chat-templated prompt followed by the answer tokens and, for answers
that ended (all refusals; model answers that stopped by themselves), the end-of-turn token; the
loss covers the answer tokens only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from steerline.core.chat import render_chat
from steerline.core.errors import UserError
from steerline.steermoe.data.safety import detection_prompts

#: Refusal answers for the unsafe SFT prompts (one per prompt, chosen by a seeded hash).
REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that. It could cause serious harm to people.",
    "I'm sorry, but I won't provide that. It could be used to hurt someone or break the law.",
    "I can't assist with this request because it could cause harm.",
    "Sorry, I can't help with that. If you have another question, I'm happy to help.",
    "I must decline this request: it asks for something harmful or illegal.",
)


@dataclass(frozen=True)
class SftExample:
    prompt_id: str
    kind: str  # "refusal" (unsafe prompt) or "own_answer" (safe prompt)
    input_ids: tuple[int, ...]  # prompt + answer
    n_prompt: int  # tokens before the answer (no loss on them)


def refusal_for(prompt_id: str, seed: int) -> str:
    """The refusal template of one prompt: a seeded hash of its id, independent of row order."""
    h = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return REFUSAL_TEMPLATES[int.from_bytes(h[:8], "big") % len(REFUSAL_TEMPLATES)]


def end_of_turn_id(model_or_config: Any) -> int:
    """The first end-of-sequence id of the generation config (the chat's end-of-turn token)."""
    gen = getattr(model_or_config, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(getattr(model_or_config, "config", model_or_config), "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError("the model has no eos_token_id: cannot end the SFT answers")
    return int(eos)


def _subsample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    df = df.sort_values("prompt_id").reset_index(drop=True)
    if n is not None and len(df) > n:
        df = df.sample(n=n, random_state=seed).sort_values("prompt_id")
    return df.reset_index(drop=True)


def build_sft_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: pd.DataFrame,
    generations: pd.DataFrame,
    eos_id: int,
    seed: int,
    max_unsafe: int | None = None,
    max_safe: int | None = None,
    max_length: int = 256,
) -> list[SftExample]:
    """Refusal examples for the detect-split unsafe prompts, own-answer examples for the safe
    ones (prompt ids sorted; subsampled by seed when capped)."""
    for col in ("prompt_id", "text", "label"):
        if col not in prompts.columns:
            raise ValueError(f"safety prompts have no column {col!r}")
    for col in ("prompt_id", "answer", "finished"):
        if col not in generations.columns:
            raise ValueError(f"generations have no column {col!r}: rerun capture_routing")
    prompts = detection_prompts(prompts)  # the test split is never trained on
    unsafe = _subsample(prompts[prompts["label"] == "unsafe"], max_unsafe, seed)
    repeated = sorted(set(generations["prompt_id"][generations["prompt_id"].duplicated()]))
    if repeated:  # each lookup below must give one answer, not a Series of them
        raise UserError(f"generations repeat prompt_id {', '.join(map(str, repeated[:8]))}: one "
                        "answer per prompt expected; rerun capture_routing")
    gens = generations.set_index("prompt_id")
    safe = prompts[(prompts["label"] == "safe") & prompts["prompt_id"].isin(gens.index)]
    safe = safe[[bool(str(gens.loc[p, "answer"]).strip()) for p in safe["prompt_id"]]]
    safe = _subsample(safe, max_safe, seed)
    if unsafe.empty:
        raise ValueError("no detect-split unsafe prompts to pair with refusals")
    out: list[SftExample] = []
    for kind, df in (("refusal", unsafe), ("own_answer", safe)):
        for row in df.itertuples(index=False):
            prompt = render_chat(tokenizer, str(row.text)).ids
            if kind == "refusal":
                answer, ended = refusal_for(str(row.prompt_id), seed), True
            else:
                g = gens.loc[row.prompt_id]
                answer, ended = str(g["answer"]).strip(), bool(g["finished"])
            ans = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([eos_id] * ended)
            ids = (prompt + ans)[:max_length]
            if len(ids) <= len(prompt):
                raise ValueError(
                    f"prompt {row.prompt_id!r} leaves no answer tokens within max_length="
                    f"{max_length}: raise finetune_experts.max_length"
                )
            out.append(SftExample(str(row.prompt_id), kind, tuple(ids), len(prompt)))
    return out


def collate(examples: Sequence[SftExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask [B, T], labels [B, T] (-100 outside the
    answers; the model shifts them)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt: n] = ids[i, e.n_prompt: n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

