"""Each family's rule (`families.select` / `steer`) against the routing function vLLM itself runs
for it, on random logits, with no engine: the router vLLM's fused MoE is built with on CPU
(`CPURouter`, from the arguments vLLM's model file passes), DeepSeek's GPU-path `grouped_topk`
too. The same ids (as sets per token) and weights within float32 tolerance, plain and under the
SteerMoE edit the vLLM worker applies (new logits, or DeepSeek-V3's rows set inside the router).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from families import FAMILY_NAMES, build
from torch import nn

from steerline.model.arch import find_routers
from steerline.model.families import RouterRule, steer, steer_logits, vllm_router_kwargs

pytest.importorskip("vllm", reason="vLLM is installed by `make setup`")

from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter  # noqa: E402
from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import (  # noqa: E402
    grouped_topk,
)
from vllm.model_executor.models.phimoe import phimoe_routing_function  # noqa: E402

from steerline.backends.vllm_worker import check_engine_router, forced_routing  # noqa: E402


def vllm_model_args(name: str, config: Any, bias: torch.Tensor | None) -> dict[str, Any]:
    """The routing arguments vLLM 0.32's model file gives FusedMoE for family `name`
    (vllm/model_executor/models/<file>.py)."""
    if name in ("qwen2_moe", "qwen2_moe_dense0", "qwen3_moe"):
        return dict(renormalize=config.norm_topk_prob)  # Qwen2MoeSparseMoeBlock / Qwen3
    if name == "olmoe":
        return dict(renormalize=False)  # OlmoeMoE
    if name in ("mixtral", "granitemoe", "gpt_oss"):
        return dict(renormalize=True)  # MixtralMoE, GraniteMoeMoE, gpt_oss MLPBlock
    if name == "phimoe":
        return dict(renormalize=False, custom_routing_function=phimoe_routing_function)
    if name in ("deepseek_v2", "deepseek_v3"):  # DeepseekV2MoE (V3 shares it)
        noaux = getattr(config, "topk_method", None) == "noaux_tc"
        return dict(renormalize=config.norm_topk_prob, use_grouped_topk=True,
                    num_expert_group=getattr(config, "n_group", 1),
                    topk_group=getattr(config, "topk_group", 1),
                    scoring_func=getattr(config, "scoring_func", None) or "softmax",
                    routed_scaling_factor=getattr(config, "routed_scaling_factor", 1.0),
                    e_score_correction_bias=bias if noaux else None)
    raise KeyError(name)


def _config(name: str) -> tuple[nn.Module, Any]:
    model = build(name)
    if name == "deepseek_v3":  # what a real DeepSeek-V3 config.json declares (check_vllm_family)
        model.config.topk_method, model.config.scoring_func = "noaux_tc", "sigmoid"
    return model, model.config


def _sets(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.long().argsort(dim=-1)
    return ids.long().gather(-1, order), w.float().gather(-1, order)


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]):
    (gi, gw), (wi, ww) = _sets(*got), _sets(*want)
    assert torch.equal(gi, wi), (gi != wi).any(-1).nonzero()[:5]
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_vllm_routing_function_equals_the_family_rule_plain_and_steered(name):
    model, config = _config(name)
    site = find_routers(model)[-1]
    n_experts = int(site.module.weight.shape[0])
    # vLLM's gate is a plain linear layer (DeepSeek's correction bias its attribute): the rule
    # the worker derives from it and the config equals the transformers router's
    bias = getattr(site.module, "e_score_correction_bias", None)
    gate = nn.Linear(config.hidden_size, n_experts)
    gate.e_score_correction_bias = bias
    r = RouterRule.of(gate, config)
    want = site.rule
    assert (r.rule, r.top_k, r.norm, r.scaling, r.n_group, r.topk_group, r.jitter_eps) == (
        want.rule, want.top_k, want.norm, want.scaling, want.n_group, want.topk_group,
        want.jitter_eps)

    args = vllm_model_args(name, config, bias)
    ours = vllm_router_kwargs(r)
    for key, value in args.items():  # what vLLM builds is what the worker expects
        if key == "custom_routing_function":
            assert ours[key] is value
        elif key == "e_score_correction_bias":
            assert (ours[key] is None) == (value is None)
        else:
            assert ours[key] == value, key
    router = CPURouter(top_k=r.top_k, global_num_experts=n_experts, **args)
    check_engine_router(router, r, site.layer)  # the worker's load-time check passes

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(96, n_experts, generator=gen) * 2
    hidden = torch.zeros(96, config.hidden_size)
    plain = router._compute_routing(hidden, logits, None)
    from steerline.model.families import select

    ids, w = select(logits, r)
    _assert_same((plain[1], plain[0]), (ids, w))
    if args.get("use_grouped_topk"):  # the GPU path's torch implementation, same arguments
        g_args = {k: v for k, v in args.items() if k != "use_grouped_topk"}
        gw, gi = grouped_topk(hidden, logits, r.top_k, **g_args)
        _assert_same((gi, gw), (ids, w))

    act, deact = torch.tensor([3]), torch.tensor([5])
    _, s_ids, s_w = steer(logits, r, act, deact, 0.01)
    assert (s_ids == 3).any(-1).all() and not (s_ids == 5).any()
    edited = steer_logits(logits, r, act, deact, 0.01)
    if edited is not None:  # the worker's logit edit, ranked by vLLM's own routing
        got = router._compute_routing(hidden, edited, None)
    else:  # DeepSeek-V3: steered rows set inside vLLM's router, the others its own
        rows = torch.arange(0, 96, 2)
        _, f_ids, f_w = steer(logits[rows], r, act, deact, 0.01)
        compute = forced_routing(router._compute_routing, lambda: [(rows, f_ids, f_w)])
        got = compute(hidden, logits, None)
        _assert_same((got[1][1::2], got[0][1::2]), (ids[1::2], w[1::2]))
        got = (got[0][rows], got[1][rows])
        s_ids, s_w = s_ids[rows], s_w[rows]
    _assert_same((got[1], got[0]), (s_ids, s_w))
    assert got[1].dtype == torch.int32 and got[0].dtype == torch.float32


def test_engine_router_mismatch_is_one_clear_error():
    model, config = _config("olmoe")
    site = find_routers(model)[-1]
    r = RouterRule(rule="softmax_topk", top_k=2, norm=True)  # transformers would renormalise
    with pytest.raises(RuntimeError, match="renormalize=False.*renormalize=True"):
        check_engine_router(CPURouter(top_k=2, global_num_experts=8, renormalize=False), r,
                            site.layer)
