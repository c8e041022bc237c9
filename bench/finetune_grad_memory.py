"""Benchmark: the memory of one finetune_experts backward pass, listed rows' gradients
(ExpertSlices' post-accumulate hooks) against autograd's whole gradients of the fused expert
tensors (what finetuning kept until the optimizer step before: every layer holding a trained
expert held an [E, ...] gradient per fused tensor).

Model: a random Qwen2-MoE in float32 with 64 experts per layer (hidden 256, expert width 256,
4 heads of 64), 2 listed experts in each of --layers layers; one forward + backward of a fixed
batch (2 x 64 tokens) in the eager experts loop that finetuning uses. Each method runs in its
own child process (baseline first); its cost is the peak RSS growth of the step (ru_maxrss after
the step minus before it). The fused tensors' whole gradients are 48 MB a layer here (Qwen3-30B-
A3B: 2.4 GB a layer in float32).

ratio = rows' peak growth / whole gradients' peak growth; goal <= 0.5 at 12 layers. Measured on
2 cores: whole 564 / 789 MB at 8 / 12 layers, rows 295 / 280 MB: the rows' cost is the
activations and one layer's transient gradient, flat in the layers. equal: the listed rows'
gradients are bit-identical (sha256 of their bytes). The last line is one JSON object
(tools.bench_contract).
"""

from __future__ import annotations

# isort: off
import steerline  # noqa: F401  (the numerics contract: before numpy / torch load)

# isort: on

import argparse
import hashlib
import json
import resource
import subprocess
import sys

import torch
from quick import QUICK

EXPERTS_PER_LAYER = (5, 40)  # the listed experts of every layer


def model_and_batch(layers: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=256,
                         moe_intermediate_size=256, shared_expert_intermediate_size=0,
                         num_experts=64, num_experts_per_tok=8, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                         max_position_embeddings=256, decoder_sparse_step=1)
    model = Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    model.set_experts_implementation("eager")
    model.train()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    return model, ids


def child(method: str, layers: int) -> None:
    """One backward pass by `method`; prints {"growth_kb", "sha256"}."""
    from steerline.steermoe.finetuning.expert_slices import ExpertSlices

    model, ids = model_and_batch(layers)
    slices = ExpertSlices(model, [[layer, e] for layer in range(layers)
                                  for e in EXPERTS_PER_LAYER])
    if method == "rows":
        slices.freeze(model)
    else:  # the fused tensors' whole gradients, held until read
        for p in model.parameters():
            p.requires_grad_(False)
        for s in slices.slices:
            s.param.requires_grad_(True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = (slices.grads() if method == "rows"
             else [s.param.grad.index_select(0, s.rows) for s in slices.slices])
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    h = hashlib.sha256()
    for g in grads:
        h.update(g.contiguous().numpy().tobytes())
    print(json.dumps({"growth_kb": growth, "sha256": h.hexdigest()}))


def run_child(method: str, layers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, "--layers", str(layers)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2 if QUICK else 12)
    ap.add_argument("--child", choices=["whole", "rows"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.layers)
        return
    whole, rows = run_child("whole", args.layers), run_child("rows", args.layers)
    grad_mb = args.layers * 64 * (3 * 256 * 256) * 4 / 2**20  # both fused tensors, fp32
    print(f"{args.layers} layers: whole gradients {grad_mb:.0f} MB; peak RSS growth of the step: "
          f"whole {whole['growth_kb'] / 1024:.0f} MB, rows {rows['growth_kb'] / 1024:.0f} MB")
    result = {
        "bench": "finetune_grad_memory",
        "ratio": round(rows["growth_kb"] / max(1, whole["growth_kb"]), 3),
        "equal": whole["sha256"] == rows["sha256"],
        "goal": "ratio <= 0.5",  # see the module docstring
        "baseline": "whole_fused_gradients",
        "layers": args.layers,
        "whole_gradients_mb": round(grad_mb, 1),
        "whole_growth_mb": round(whole["growth_kb"] / 1024, 1),
        "rows_growth_mb": round(rows["growth_kb"] / 1024, 1),
        "quick": QUICK,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
