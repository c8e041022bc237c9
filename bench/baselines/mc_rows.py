"""The multiple-choice scorer as it stood when bench/mc_scoring.py's goal was set (row per
choice, each on a copy of its prompt's KV cache), kept verbatim as that bench's named baseline
(`kv_cache_rows`). The pipeline scores with steerline.mat_steer.evaluate.score_choices."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.core.generation import pad_id, right_pad
from steerline.mat_steer.evaluate import MCItem, encode_items


def _batches(encoded: Sequence[tuple[list[int], list[list[int]]]], max_rows: int
             ) -> list[list[int]]:
    """Item indices grouped so each batch has at most max_rows choice rows (>= 1 item)."""
    order = np.argsort([len(p) for p, _ in encoded], kind="stable")
    batches: list[list[int]] = []
    cur: list[int] = []
    rows = 0
    for i in order:
        n = len(encoded[i][1])
        if cur and rows + n > max_rows:
            batches.append(cur)
            cur, rows = [], 0
        cur.append(int(i))
        rows += n
    if cur:
        batches.append(cur)
    return batches


@torch.inference_mode()
def score_choices_rows(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                       items: Sequence[MCItem], max_rows: int = 64) -> list[np.ndarray]:
    """Pass 1 runs a group of prompts without their last token (KV cache kept); pass 2 runs the
    group's choice rows, sorted by length in chunks of `max_rows`, each row = [last prompt
    token] + choice[:-1] on a copy of its item's cache with explicit positions."""
    decoder = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    pid = pad_id(tokenizer)
    encoded = encode_items(tokenizer, items)
    out: list[np.ndarray] = [np.zeros(len(cs)) for _, cs in encoded]
    for batch in _batches(encoded, 2 * max_rows):
        prompts = [encoded[i][0] for i in batch]
        p_ids, p_mask = right_pad([p[:-1] for p in prompts], pid)  # [G, Wp]
        past = decoder(input_ids=p_ids.to(device), attention_mask=p_mask.to(device),
                       use_cache=True).past_key_values
        rows = [(g, j) for g, i in enumerate(batch) for j in range(len(encoded[i][1]))]
        rows.sort(key=lambda r: len(encoded[batch[r[0]]][1][r[1]]))
        for start in range(0, len(rows), max_rows):
            chunk = rows[start: start + max_rows]
            conts = [encoded[batch[g]][1][j] for g, j in chunk]
            c_ids, c_mask = right_pad([[prompts[g][-1], *c[:-1]] for (g, _), c in
                                       zip(chunk, conts, strict=True)], pid)  # [R, Wc]
            sel = torch.tensor([g for g, _ in chunk])  # [R]
            start_pos = torch.tensor([len(prompts[g]) - 1 for g, _ in chunk])  # [R]
            cache = copy.deepcopy(past)
            cache.reorder_cache(sel.to(device))  # [G, ...] -> [R, ...]
            hidden = decoder(
                input_ids=c_ids.to(device),
                attention_mask=torch.cat([p_mask[sel], c_mask], dim=1).to(device),
                position_ids=(start_pos.unsqueeze(1) + torch.arange(c_ids.shape[1])).to(device),
                past_key_values=cache, use_cache=True).last_hidden_state  # [R, Wc, D]
            valid = c_mask.bool().to(device)
            logp = torch.log_softmax(head(hidden[valid]).float(), dim=-1)  # [N_valid, V]
            tgt = torch.tensor([t for c in conts for t in c], device=device)  # [N_valid]
            tok_lp = logp.gather(1, tgt.unsqueeze(1)).squeeze(1).double().cpu()  # [N_valid]
            for (g, j), lp in zip(chunk, torch.split(tok_lp, [len(c) for c in conts]),
                                  strict=True):
                out[batch[g]][j] = float(lp.sum())
    return out
