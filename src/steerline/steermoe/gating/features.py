"""What a prompt gate reads: one unsteered forward pass over the rendered chat prompt.

- `routing`: per (MoE layer, expert), the share of the user's tokens whose top-k holds that
  expert (the count matrix risk_diff builds, per prompt): [N, L * E], layer-major;
- `residual`: the mean residual stream entering decoder layer `layer` over the user's tokens
  (hidden_states[layer]; 0 = the embeddings): [N, D].
Template tokens (system prompt, role markers) are the same in every prompt and are left out, as
in risk_diff's `user` scope.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from steerline.core.chat import render_chat
from steerline.core.generation import right_pad
from steerline.model.arch import decoder_layers
from steerline.steering.capture import RoutingRecorder

Source = Literal["routing", "residual"]
SOURCES: tuple[Source, ...] = ("routing", "residual")


def probe_layers(depths: Sequence[float], n_layers: int) -> list[int]:
    """hidden_states indices of `depths` (fractions of an n_layers-deep decoder): round(depth x
    n_layers), halves up, in the order given, each once (a shallow model maps two depths to one
    layer)."""
    out: list[int] = []
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"prompt_gate depth {d} is not a fraction of the depth in [0, 1]: "
                             "fix prompt_gate.depths")
        layer = math.floor(d * n_layers + 0.5)
        if layer not in out:
            out.append(layer)
    return out


@torch.inference_mode()
def prompt_features(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    layers: Sequence[int], batch_size: int, desc: str = "gate features",
) -> dict[str, np.ndarray]:
    """{"routing": [N, L*E], "residual_<layer>": [N, D] for each layer} in the order of texts."""
    n_layers = len(decoder_layers(model))
    for layer in layers:
        if not 0 <= layer <= n_layers:
            raise ValueError(f"residual layer {layer} is outside the model's 0..{n_layers} "
                             "(hidden_states index: 0 = embeddings): a gate is read on the model "
                             "it was fit on (rerun train_gate for this model)")
    chats = [render_chat(tokenizer, t) for t in texts]
    recorder = RoutingRecorder(model)
    n_sites, n_experts = len(recorder.sites), recorder.n_experts
    routing = np.zeros((len(chats), n_sites * n_experts), dtype=np.float32)
    hidden = int(model.config.hidden_size)
    residual = {layer: np.zeros((len(chats), hidden), np.float32) for layer in layers}
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # batches of similar length (less padding); right padding keeps each prompt's states as alone
    order = sorted(range(len(chats)), key=lambda i: len(chats[i].ids))
    with recorder.recording():
        for start in tqdm(range(0, len(chats), batch_size), desc=desc, leave=False):
            rows = order[start: start + batch_size]
            chunk = [chats[i] for i in rows]
            ids, mask = right_pad([c.ids for c in chunk], pad)  # [B, T]
            user = torch.zeros(ids.shape, dtype=torch.bool)  # the user's own tokens
            for i, c in enumerate(chunk):
                user[i, : len(c.ids)] = ~torch.tensor(c.is_template, dtype=torch.bool)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        output_hidden_states=True, logits_to_keep=1)
            top, _ = recorder.collect(*ids.shape)  # [B, T, L*k]
            n_user = user.sum(1).clamp(min=1).double()  # [B]
            w = user.double() / n_user[:, None]  # [B, T] mean weights over user tokens
            hits = torch.nn.functional.one_hot(
                top.long().cpu().reshape(*ids.shape, n_sites, -1), n_experts).sum(-2)  # [B,T,L,E]
            share = torch.einsum("bt,btle->ble", w, hits.double())  # [B, L, E]
            routing[rows] = share.reshape(len(chunk), -1).float().numpy()
            for layer in layers:
                h = out.hidden_states[layer].double().cpu()  # [B, T, D]
                residual[layer][rows] = torch.einsum("bt,btd->bd", w, h).float().numpy()
    return {"routing": routing} | {f"residual_{layer}": residual[layer] for layer in layers}
