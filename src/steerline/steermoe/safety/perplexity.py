"""The capability check `ppl_benign`: perplexity of the unsteered model's own greedy answers to
the safe prompts under each model (teacher forced, answer tokens only), so 1.0x base = untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from steerline.core.chat import render_chat
from steerline.steering.experts import SteeringPlan, expert_steering


@torch.inference_mode()
def answer_nll_rows(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    answers: Sequence[str], batch_size: int, desc: str = "perplexity",
) -> tuple[np.ndarray, np.ndarray]:
    """Per (text, answer) pair: -log p of the answer given its chat prompt [N] float64 and its
    token count [N] (an empty answer: 0, 0)."""
    seqs: list[tuple[list[int], int, int]] = []  # (ids, prompt length, row)
    for row, (t, a) in enumerate(zip(texts, answers, strict=True)):
        ans = tokenizer(a, add_special_tokens=False)["input_ids"]
        if ans:
            p = render_chat(tokenizer, t).ids
            seqs.append((p + ans, len(p), row))
    if not seqs:
        raise ValueError("no non-empty reference answers to score")
    pad = tokenizer.pad_token_id
    nll, count = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        chunk = [seqs[i] for i in order[s: s + batch_size]]
        width = max(len(ids) for ids, _, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        target = torch.zeros((len(chunk), width), dtype=torch.bool)  # predicted answer tokens
        for i, (seq, n_p, _) in enumerate(chunk):  # right padding
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            target[i, n_p: len(seq)] = True
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B,T,V]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # predicts tokens 1..T-1
        tgt = ids[:, 1:].to(device)
        tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
        sel = target[:, 1:].to(device)
        per_row = -(tok_lp.double() * sel).sum(1).cpu().numpy()  # [B]
        for i, (_, _, row) in enumerate(chunk):
            nll[row], count[row] = per_row[i], int(sel[i].sum())
    return nll, count


def answer_nll(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    answers: Sequence[str], batch_size: int, desc: str = "perplexity",
) -> tuple[float, int]:
    """(sum of -log p, number of tokens) of each answer given its chat prompt, over all pairs."""
    nll, count = answer_nll_rows(model, tokenizer, texts, answers, batch_size, desc)
    return float(nll.sum()), int(count.sum())


def benign_nll_rows(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    reference: pd.DataFrame, plan: SteeringPlan | None, batch_size: int,
                    name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-row NLL and token counts of the reference answers (columns text, answer) under
    `model` steered by `plan`: the capability check, before it is pooled into a perplexity."""
    with expert_steering(model, plan or SteeringPlan()):
        return answer_nll_rows(model, tokenizer, reference["text"].tolist(),
                               reference["answer"].tolist(), batch_size,
                               desc=f"{name} perplexity")


def benign_ppl(model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: pd.DataFrame,
               plan: SteeringPlan | None, batch_size: int, name: str) -> float:
    """Perplexity of the reference answers under `model` steered by `plan`."""
    nll, n_tok = benign_nll_rows(model, tokenizer, reference, plan, batch_size, name)
    return float(np.exp(nll.sum() / n_tok.sum()))
