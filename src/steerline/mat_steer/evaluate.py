"""Multiple-choice evaluation by log-likelihood, with any steering applied by a runtime hook.

score(choice) = sum_k log P(c_k | prompt, c_<k) for the tokens c of " " + choice (the standard
lm-evaluation-harness definition, unnormalized). Metrics:
  TruthfulQA MC1: the MC1 answer has the highest score among the MC1 choices.
  TruthfulQA MC2: sum of exp(score) over true MC2 answers / sum over all MC2 answers.
  BBQ accuracy (3 choices), ToxiGen accuracy (No / Yes: is the statement hateful).

The prompt is encoded once per item and its KV cache shared by the item's choices; the steering
hook is active in both passes, so every prompt and answer token is steered exactly as in a single
full-sequence forward (tests check the two agree).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from steerline.core.generation import pad_id, right_pad
from steerline.steering.residual import SteerFn, steering_hook

METRICS = ("truthfulqa_mc1", "truthfulqa_mc2", "bbq_acc", "toxigen_acc")


@dataclass(frozen=True)
class MCItem:
    prompt: str
    choices: tuple[str, ...]


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    for attr in ("final_logit_softcapping", "logits_scaling"):
        if getattr(model.config, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"{type(model).__name__} rescales its logits ({attr}); "
                                      "scoring applies the LM head directly")
    return getattr(model, model.base_model_prefix), model.get_output_embeddings()


def encode_items(tokenizer: PreTrainedTokenizerBase, items: Sequence[MCItem]
                 ) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, [ids of " " + choice]) per item."""
    out = []
    for it in items:
        p = tokenizer(it.prompt, add_special_tokens=True)["input_ids"]
        cs = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in it.choices]
        if len(p) < 2 or any(len(c) == 0 for c in cs):
            raise ValueError(f"prompt needs >= 2 tokens and every choice >= 1: {it.prompt[:60]!r}")
        out.append((p, cs))
    return out


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
def score_choices(model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: Sequence[MCItem],
                  max_rows: int = 64, desc: str = "score") -> list[np.ndarray]:
    """Log-likelihood of each choice given its prompt: one float64 array per item.

    Pass 1 runs a group of prompts without their last token (right-padded, KV cache kept).
    Pass 2 runs the group's choice rows, sorted by length in chunks of `max_rows` (little
    padding), each row = [last prompt token] + choice[:-1] on a copy of its item's cache with
    explicit positions, so each choice token is predicted exactly as in the full sequence."""
    decoder, head = _decoder_and_head(model)
    device = next(model.parameters()).device
    pid = pad_id(tokenizer)
    encoded = encode_items(tokenizer, items)
    out: list[np.ndarray] = [np.zeros(len(cs)) for _, cs in encoded]
    for batch in tqdm(_batches(encoded, 2 * max_rows), desc=desc, unit="batch", leave=False):
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
            sel = torch.tensor([g for g, _ in chunk])
            cache = copy.deepcopy(past)
            cache.reorder_cache(sel.to(device))  # [G, ...] -> [R, ...]
            start_pos = torch.tensor([len(prompts[g]) - 1 for g, _ in chunk])  # [R]
            positions = start_pos.unsqueeze(1) + torch.arange(c_ids.shape[1])  # [R, Wc]
            mask = torch.cat([p_mask[sel], c_mask], dim=1)  # [R, Wp + Wc]
            hidden = decoder(input_ids=c_ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), past_key_values=cache,
                             use_cache=True).last_hidden_state  # [R, Wc, D]
            valid = c_mask.bool().to(device)
            logp = torch.log_softmax(head(hidden[valid]).float(), dim=-1)  # [N_valid, V]
            tgt = torch.tensor([t for c in conts for t in c], device=device)
            tok_lp = logp.gather(1, tgt.unsqueeze(1)).squeeze(1).double().cpu()  # [N_valid]
            for (g, j), lp in zip(chunk, torch.split(tok_lp, [len(c) for c in conts]),
                                  strict=True):
                out[batch[g]][j] = float(lp.sum())
    return out


@torch.inference_mode()
def score_choices_reference(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                            items: Sequence[MCItem]) -> list[np.ndarray]:
    """Unbatched, uncached reference: one full forward per (prompt + choice). For tests."""
    device = next(model.parameters()).device
    out = []
    for p, cs in encode_items(tokenizer, items):
        scores = []
        for c in cs:
            ids = torch.tensor([p + c], device=device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            scores.append(float(logp[pos, torch.tensor(c)].double().sum()))
        out.append(np.array(scores))
    return out


# ---------------------------------------------------------------------------- metrics


def mc2_score(scores: np.ndarray, labels: Sequence[int]) -> float:
    """Normalized probability mass on the true answers."""
    labels = np.asarray(labels, dtype=bool)
    p = np.exp(scores - scores.max())
    return float(p[labels].sum() / p.sum())


def task_items(df: pd.DataFrame, split: str, max_items: int | None = None,
               rng: np.random.Generator | None = None) -> pd.DataFrame:
    """One row per evaluation item of `split` (first row of each item_id), optionally capped."""
    items = df[df["split"] == split].drop_duplicates("item_id").reset_index(drop=True)
    if max_items is not None and len(items) > max_items:
        rng = rng or np.random.default_rng(0)
        items = items.iloc[np.sort(rng.choice(len(items), max_items, replace=False))]
    return items.reset_index(drop=True)


def mc_items(task: str, items: pd.DataFrame) -> tuple[list[MCItem], list[dict]]:
    """Items to score and, per item, what the metric needs (indices into the scored choices)."""
    out, info = [], []
    for row in items.itertuples(index=False):
        choices = list(row.choices)
        if task == "truthfulqa":
            union = list(dict.fromkeys(choices + list(row.mc2_choices)))
            out.append(MCItem(row.prompt, tuple(union)))
            info.append({"mc1": [union.index(c) for c in choices], "correct": row.correct_idx,
                         "mc2": [union.index(c) for c in row.mc2_choices],
                         "mc2_labels": list(row.mc2_labels)})
        else:
            out.append(MCItem(row.prompt, tuple(choices)))
            info.append({"correct": row.correct_idx})
    return out, info


def task_item_values(task: str, scores: Sequence[np.ndarray], info: Sequence[dict]
                     ) -> dict[str, np.ndarray]:
    """Per-item metric values [n_items] (0/1 correctness, MC2 probability mass)."""
    pairs = list(zip(scores, info, strict=True))
    if task == "truthfulqa":
        mc1 = [float(np.argmax(s[i["mc1"]]) == i["correct"]) for s, i in pairs]
        mc2 = [mc2_score(s[i["mc2"]], i["mc2_labels"]) for s, i in pairs]
        return {"truthfulqa_mc1": np.array(mc1), "truthfulqa_mc2": np.array(mc2)}
    return {f"{task}_acc": np.array([float(np.argmax(s) == i["correct"]) for s, i in pairs])}


def task_metrics(task: str, scores: Sequence[np.ndarray], info: Sequence[dict]
                 ) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in task_item_values(task, scores, info).items()}


def evaluate_items(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                   items_by_task: Mapping[str, pd.DataFrame], layer: int,
                   fn: SteerFn | Mapping[str, SteerFn | None] | None, max_rows: int = 64,
                   name: str = "") -> dict[str, np.ndarray]:
    """Per-item values of every task metric with a steering function hooked at `layer`: one `fn`
    for all tasks, a mapping task -> fn (each task steered by its own function), or None (the
    unsteered model)."""
    values: dict[str, np.ndarray] = {}
    for task, items in items_by_task.items():
        task_fn = fn.get(task) if isinstance(fn, Mapping) else fn
        with steering_hook(model, layer, task_fn):
            mc, info = mc_items(task, items)
            scores = score_choices(model, tokenizer, mc, max_rows, desc=f"{name} {task}")
            values.update(task_item_values(task, scores, info))
    return {k: values[k] for k in METRICS if k in values}


def evaluate_condition(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                       items_by_task: Mapping[str, pd.DataFrame], layer: int,
                       fn: SteerFn | Mapping[str, SteerFn | None] | None, max_rows: int = 64,
                       name: str = "") -> dict[str, float]:
    """All task metrics (means over items) with `fn` hooked at `layer` (see evaluate_items)."""
    values = evaluate_items(model, tokenizer, items_by_task, layer, fn, max_rows, name)
    return {k: float(v.mean()) for k, v in values.items()}


def means(values: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-metric means and their average ("average")."""
    out = {k: float(np.mean(v)) for k, v in values.items()}
    out["average"] = float(np.mean(list(out.values())))
    return out
