"""MoEfication: turn a dense Llama into a Qwen2-MoE checkpoint that transformers and vLLM load.

Per layer, the SwiGLU neurons are split into
- a shared expert: the neurons that carry the most output on calibration tokens, always on
  (Qwen2-MoE's shared expert; its sigmoid gate has zero weights, so it is exactly 0.5 and the
  shared down projection is doubled);
- n_experts routed experts of equal size: k-means on the neurons' co-activation profiles, then a
  balanced assignment.
The router is a ridge regression from the FFN input (post-attention RMSNorm) to each routed
expert's output norm, rescaled so the router logits have std `router_tau`: the renormalised
top-k softmax weights are then ~1/k, and each expert's down projection is multiplied by k, so
with top_k == n_experts the MoE reproduces the dense FFN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits
from tqdm import tqdm
from transformers import LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from steerline.core.generation import greedy_generate_all, right_pad


@dataclass(frozen=True)
class MoeSpec:
    n_experts: int
    top_k: int
    shared_fraction: float
    router_tau: float = 1e-3
    ridge_alpha: float = 1.0
    refit_lambda: float = 0.0  # > 0: least-squares refit of down projections (see refit_down)
    seed: int = 0

    def sizes(self, intermediate: int) -> tuple[int, int]:
        """(shared neurons, neurons per routed expert); the routed part divides evenly."""
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")
        per_expert = int(round(intermediate * (1 - self.shared_fraction))) // self.n_experts
        if per_expert < 1:
            raise ValueError("n_experts too large for the routed neurons; lower it")
        return intermediate - per_expert * self.n_experts, per_expert

    def active_fraction(self, intermediate: int) -> float:
        shared, per_expert = self.sizes(intermediate)
        return (shared + self.top_k * per_expert) / intermediate


@dataclass
class LayerCalib:
    x: torch.Tensor  # [N, H] FFN input (post-attention RMSNorm)
    act: torch.Tensor  # [N, I] SwiGLU activation act(gate(x)) * up(x)


def principal_coordinates(profiles: np.ndarray, k: int) -> np.ndarray:
    """The rows of `profiles` [n, d] on its top-k principal axes, U[:, :k] * S[:k] of its thin
    SVD, in `profiles`' dtype; each column's sign makes its largest-magnitude entry positive.

    From the eigendecomposition of the float64 Gram matrix (the smaller of X X^T and X^T X) with
    BLAS on one thread: numpy's multithreaded SVD is extremely slow on a busy shared CPU."""
    x = np.asarray(profiles, dtype=np.float64)
    k = min(k, *x.shape)
    with threadpool_limits(limits=1, user_api="blas"):
        if x.shape[0] <= x.shape[1]:
            w, u = np.linalg.eigh(x @ x.T)  # ascending eigenvalues = squared singular values
            coords = u[:, ::-1][:, :k] * np.sqrt(np.clip(w[::-1][:k], 0.0, None))
        else:
            _, v = np.linalg.eigh(x.T @ x)
            coords = x @ v[:, ::-1][:, :k]
    pivot = coords[np.argmax(np.abs(coords), axis=0), np.arange(k)]
    coords *= np.where(pivot < 0, -1.0, 1.0)
    return coords.astype(profiles.dtype, copy=False)


def balanced_groups(profiles: np.ndarray, n_groups: int, seed: int) -> np.ndarray:
    """Cluster rows of `profiles` [n, d] into n_groups groups of exactly n / n_groups rows."""
    n = profiles.shape[0]
    size = n // n_groups
    if profiles.shape[1] > 64:
        # k-means only needs the profiles' geometry: 64 principal directions keep it and make
        # clustering seconds instead of minutes (k-means and the assignment below see only
        # distances, so a column's sign does not change the groups).
        profiles = principal_coordinates(profiles, 64)
    # One OpenMP thread: scikit-learn's k-means adds per-thread partial centers in the order the
    # threads finish, so its centers (and the groups) would vary from run to run otherwise.
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=n_groups, n_init=3, random_state=seed).fit(profiles)
    c = km.cluster_centers_
    dist = (profiles**2).sum(1)[:, None] - 2 * profiles @ c.T + (c**2).sum(1)[None]  # [n, G]
    # Greedy balanced assignment: most confident (neuron, cluster) pairs first, capacity `size`.
    order = np.argsort(dist, axis=None, kind="stable")
    assign = np.full(n, -1)
    load = np.zeros(n_groups, dtype=int)
    for flat in order:
        i, g = divmod(int(flat), n_groups)
        if assign[i] < 0 and load[g] < size:
            assign[i] = g
            load[g] += 1
    return assign


@dataclass
class LayerPlan:
    shared: np.ndarray  # [S] neuron indices of the shared expert
    experts: np.ndarray  # [E, I/E'] neuron indices of each routed expert
    router: np.ndarray  # [E, H] router weight (already temperature-scaled)
    down: torch.Tensor  # [H, I] down projection refit to the routing (dense's if not refit)


def plan_layer(
    calib: LayerCalib,
    w_down: torch.Tensor,
    spec: MoeSpec,
    intermediate: int,
    target: torch.Tensor | None = None,
) -> LayerPlan:
    """Choose shared neurons, routed groups and a ridge router for one layer; the refit makes
    the routed FFN match `target` [N, H] (default: the dense FFN output)."""
    n_shared, per_expert = spec.sizes(intermediate)
    act = calib.act.float()
    contrib = act.abs() * w_down.float().norm(dim=0)  # [N, I] each neuron's output magnitude
    importance = contrib.mean(0)
    order = torch.argsort(importance, descending=True).numpy()
    shared = np.sort(order[:n_shared])
    routed = np.sort(order[n_shared:])[: per_expert * spec.n_experts]
    prof = contrib[:, routed].T.numpy()  # [R, N]
    prof = prof / (np.linalg.norm(prof, axis=1, keepdims=True) + 1e-12)
    assign = balanced_groups(prof, spec.n_experts, spec.seed)
    experts = np.stack([np.sort(routed[assign == g]) for g in range(spec.n_experts)])
    # Target: each routed expert's output norm per token [N, E].
    out_norm = torch.stack(
        [(act[:, g] @ w_down.float()[:, g].T).norm(dim=1) for g in experts], dim=1
    ).double()
    x = calib.x.double()
    norm_c = out_norm - out_norm.mean(0)  # ranking per token is all that matters
    gram = x.T @ x + spec.ridge_alpha * torch.eye(x.shape[1], dtype=x.dtype)
    coef = torch.linalg.solve(gram, x.T @ norm_c).T  # [E, H]
    logits = x @ coef.T  # [N, E]
    scale = spec.router_tau / float(logits.std().clamp_min(1e-12))
    down = w_down.float()
    if spec.refit_lambda > 0:
        down = refit_down(act, down, shared, experts, logits.float(), spec, target)
    return LayerPlan(
        shared=shared, experts=experts, router=(coef * scale).float().numpy(), down=down.float()
    )


def keep_mask(
    act: torch.Tensor, shared: np.ndarray, experts: np.ndarray, logits: torch.Tensor, top_k: int
) -> torch.Tensor:
    """[N, I] 1.0 where a neuron is active: shared, or in one of the router's top-k experts."""
    keep = torch.zeros_like(act)
    keep[:, torch.as_tensor(shared)] = 1.0
    top = logits.topk(top_k, dim=1).indices  # [N, k]
    keep[torch.arange(act.shape[0])[:, None, None], torch.as_tensor(experts)[top]] = 1.0
    return keep


def refit_down(
    act: torch.Tensor,
    w_down: torch.Tensor,
    shared: np.ndarray,
    experts: np.ndarray,
    logits: torch.Tensor,
    spec: MoeSpec,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Least-squares refit of the down projection given the routing, so kept neurons compensate
    for the dropped ones: min ||(act * keep) W^T - act W_dense^T||^2 + lam * n * ||W - W_dense||^2.
    """
    feats = act * keep_mask(act, shared, experts, logits, spec.top_k)  # [N, I]
    target = act @ w_down.T if target is None else target.float()  # [N, H]
    lam = spec.refit_lambda * float((feats * feats).sum()) / feats.shape[1]
    # Products in float32 (the cost), the I x I solve in float64 (cheap, well conditioned).
    gram = (feats.T @ feats).double() + lam * torch.eye(feats.shape[1], dtype=torch.float64)
    rhs = (feats.T @ target).double() + lam * w_down.T.double()
    return torch.linalg.solve(gram, rhs).T.float()  # [H, I]


def moe_config(dense: LlamaForCausalLM, spec: MoeSpec) -> Qwen2MoeConfig:
    c = dense.config
    shared, per_expert = spec.sizes(c.intermediate_size)
    return Qwen2MoeConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(c.rope_parameters),
        use_sliding_window=False,
        decoder_sparse_step=1,
        moe_intermediate_size=per_expert,
        shared_expert_intermediate_size=shared,
        num_experts_per_tok=spec.top_k,
        num_experts=spec.n_experts,
        norm_topk_prob=True,
        qkv_bias=True,  # vLLM's Qwen2-MoE always has q/k/v biases; zeros keep Llama's maths
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        architectures=["Qwen2MoeForCausalLM"],
    )


@torch.no_grad()
def assemble_moe(
    dense: LlamaForCausalLM, plans: list[LayerPlan], spec: MoeSpec
) -> Qwen2MoeForCausalLM:
    """Copy the dense weights into a Qwen2-MoE model following the per-layer plans."""
    config = moe_config(dense, spec)
    moe = Qwen2MoeForCausalLM(config).eval()
    sd = dense.state_dict()
    moe.model.embed_tokens.weight.copy_(sd["model.embed_tokens.weight"])
    moe.model.norm.weight.copy_(sd["model.norm.weight"])
    for i, (layer, plan) in enumerate(zip(moe.model.layers, plans, strict=True)):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, name).weight.copy_(sd[p + f"self_attn.{name}.weight"])
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, name).bias.zero_()
        layer.input_layernorm.weight.copy_(sd[p + "input_layernorm.weight"])
        layer.post_attention_layernorm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
        w_gate, w_up = sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]
        w_down = plan.down
        mlp = layer.mlp
        sh = torch.as_tensor(plan.shared)
        mlp.shared_expert.gate_proj.weight.copy_(w_gate[sh])
        mlp.shared_expert.up_proj.weight.copy_(w_up[sh])
        mlp.shared_expert.down_proj.weight.copy_(2.0 * w_down[:, sh])  # sigmoid(0) = 0.5
        mlp.shared_expert_gate.weight.zero_()
        ex = torch.as_tensor(plan.experts)  # [E, n]
        mlp.experts.gate_up_proj.copy_(torch.cat([w_gate[ex], w_up[ex]], dim=1))  # [E, 2n, H]
        mlp.experts.down_proj.copy_(spec.top_k * w_down[:, ex].permute(1, 0, 2))  # [E, H, n]
        mlp.gate.weight.copy_(torch.as_tensor(plan.router))
    if config.tie_word_embeddings:
        moe.tie_weights()
    else:
        moe.lm_head.weight.copy_(sd["lm_head.weight"])
    moe.generation_config = dense.generation_config
    return moe


@torch.no_grad()
def fidelity(
    dense: torch.nn.Module, moe: torch.nn.Module, seqs: list[list[int]], batch_size: int = 8
) -> dict[str, float]:
    """Next-token top-1 agreement and mean KL(dense || moe) over every real position of `seqs`."""
    agree = kl = n = 0.0
    max_diff = 0.0
    for start in range(0, len(seqs), batch_size):
        ids, mask = right_pad(seqs[start : start + batch_size], pad_id=0)
        real = mask.bool()
        ld = dense(input_ids=ids, attention_mask=mask).logits[real].double()
        lm = moe(input_ids=ids, attention_mask=mask).logits[real].double()
        pd, pm = ld.log_softmax(-1), lm.log_softmax(-1)
        agree += float((ld.argmax(-1) == lm.argmax(-1)).sum())
        kl += float((pd.exp() * (pd - pm)).sum())
        n += int(real.sum())
        max_diff = max(max_diff, float((ld - lm).abs().max()))
    return {"top1_agreement": agree / n, "mean_kl": kl / n, "max_abs_logit_diff": max_diff,
            "positions": int(n)}


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
    batch_size: int,
) -> list[list[int]]:
    """prompt + greedy answer token ids (answer cut after its end token) for each prompt."""
    answers = greedy_generate_all(model, prompts, max_new_tokens, pad_id, batch_size,
                                  desc="greedy answers")
    return [p + answer for p, (answer, _) in zip(prompts, answers, strict=True)]


@torch.no_grad()
def moefy(
    dense: LlamaForCausalLM, seqs: list[list[int]], spec: MoeSpec, max_tokens: int
) -> Qwen2MoeForCausalLM:
    """Build the MoE layer by layer on its own residual stream.

    Layer l is planned on the hidden states the MoE (layers < l already converted) produces,
    and its down projections are refit so that the layer's output lands on the dense model's
    residual stream: each layer corrects the error accumulated below it.
    """
    m = dense.model
    ids, mask = right_pad(seqs, pad_id=0)  # right padding: real tokens never see pads (causal)
    b, t = ids.shape
    real = mask.bool().reshape(-1)
    gen = torch.Generator().manual_seed(spec.seed)
    real_idx = real.nonzero().squeeze(1)
    fit_idx = real_idx[torch.randperm(len(real_idx), generator=gen)[:max_tokens].sort().values]
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]  # [1, 1, T, T]
    pos = torch.arange(t)[None].expand(b, t)
    x_dense = m.embed_tokens(ids)  # [B, T, H]
    x_moe = x_dense.clone()
    pe = m.rotary_emb(x_dense, position_ids=pos)
    plans = []
    for layer in tqdm(m.layers, desc="moefy layers"):
        x_next = layer(x_dense, attention_mask=causal, position_embeddings=pe)
        attn, _ = layer.self_attn(
            layer.input_layernorm(x_moe), attention_mask=causal, position_embeddings=pe
        )
        h = (x_moe + attn).reshape(b * t, -1)  # [B*T, H] residual after attention
        f_in = layer.post_attention_layernorm(h)
        mlp = layer.mlp
        act = mlp.act_fn(mlp.gate_proj(f_in)) * mlp.up_proj(f_in)  # [B*T, I]
        target = x_next.reshape(b * t, -1)[fit_idx] - h[fit_idx]  # what the FFN must add
        plan = plan_layer(
            LayerCalib(x=f_in[fit_idx], act=act[fit_idx]),
            mlp.down_proj.weight.detach(),
            spec,
            dense.config.intermediate_size,
            target=target,
        )
        plans.append(plan)
        logits = f_in @ torch.as_tensor(plan.router).T  # [B*T, E]
        ffn = (act * keep_mask(act, plan.shared, plan.experts, logits, spec.top_k)) @ plan.down.T
        x_moe = (h + ffn).reshape(b, t, -1)
        x_dense = x_next
    return assemble_moe(dense, plans, spec)
