"""The numeric cores of build_models (MoEfication), capture_routing (routed generation) and
train_steering (MAT-Steer), on tiny random inputs; prints one JSON line {core: sha256 of its
output bytes}. tests/test_numerics.py runs it in fresh processes under different thread counts
and ISA settings of the caller, which the numerics contract must make irrelevant.

Sizes: the default model's vocabulary (49,152); without the contract the moefy and mat_steer
cores give other bytes at 1 and 2 threads, and at AVX-512 and AVX2 (docs/numerics.md)."""

# isort: off
import steerline  # noqa: F401  (the numerics contract, before numpy / torch load)

# isort: on
import hashlib
import json
import sys

import numpy as np
import torch

# transformers and the steerline modules each core needs are imported inside that core: they
# take ~10 s to load on a busy 2-core machine, and the reduction control runs alone, 3 times.
VOCAB = 49152


def digest(*arrays: np.ndarray | torch.Tensor) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def moefy_core() -> tuple[str, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from steerline.model.moefy import MoeSpec, moefy

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    dense = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist()
            for n in torch.randint(12, 40, (24,), generator=g)]
    moe = moefy(dense, seqs, MoeSpec(8, 2, 0.5, refit_lambda=0.01), max_tokens=600).eval()
    state = moe.state_dict()
    return digest(*(state[k] for k in sorted(state))), moe


def capture_core(moe: torch.nn.Module) -> str:
    from steerline.core.chat import ChatPrompt
    from steerline.steering.capture import generate_routed_all

    g = torch.Generator().manual_seed(2)
    prompts = []
    for n in (5, 9, 14, 20):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        prompts.append(ChatPrompt(ids=ids, is_template=[False] * n))
    routed = generate_routed_all(moe, prompts, max_new_tokens=6, pad_id=0, batch_size=2)
    return digest(*(a for r in routed for a in (r.token_ids, r.experts, r.weights)))


def mat_steer_core() -> str:
    from steerline.mat_steer.activations import PosNeg
    from steerline.mat_steer.losses import LossWeights
    from steerline.mat_steer.train import TrainConfig, train_mat_steer

    g = torch.Generator().manual_seed(3)
    d = 64

    def attrs(n: int) -> dict[str, PosNeg]:
        return {f"a{t}": PosNeg(torch.randn(n, d, generator=g) + t,
                                torch.randn(n, d, generator=g) + t + 0.5) for t in range(3)}

    train, dev = attrs(300), attrs(60)
    cfg = TrainConfig(lr=1e-3, batch_size=96, epochs=4, sigma=2.0,
                      weights=LossWeights(mmd=1.0, sparse=0.9, ortho=0.1, pos=0.9, gate=2.0),
                      scale="median_distance", patience=0, init_scale=0.01, seed=0,
                      objective="targeted", bandwidths=(0.5, 1.0, 2.0), gate_init="probe",
                      probe_cs=(0.1, 1.0), mmd_weighting="relative", gate_target=0.9)
    module = train_mat_steer(train, dev, cfg).module
    return digest(*(p for _, p in sorted(module.state_dict().items())))


def reduction_core() -> str:
    """A sum torch splits by thread (3M floats): the control the contract must hold fixed."""
    return digest(torch.randn(3_000_000, generator=torch.Generator().manual_seed(4)).sum())


if __name__ == "__main__":
    cores = sys.argv[1:] or ["moefy", "capture", "mat_steer", "reduction"]
    out: dict[str, str] = {}
    moe = None
    for name in cores:
        if name in ("moefy", "capture") and moe is None:
            out["moefy"], moe = moefy_core()
        if name == "capture":
            out["capture"] = capture_core(moe)
        elif name == "mat_steer":
            out["mat_steer"] = mat_steer_core()
        elif name == "reduction":
            out["reduction"] = reduction_core()
    print(json.dumps({k: out[k] for k in cores}))
