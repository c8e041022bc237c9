"""Loading local checkpoints (safetensors) into transformers models, in eval mode.

Weights and tokenizer are checked before transformers or vLLM read them: a truncated
safetensors file otherwise ends in safetensors' own traceback ("incomplete metadata"), and a
directory without tokenizer files silently gets a tokenizer that encodes every text to [].
A directory holding any pickle weight file (pytorch_model.bin, *.pt, ...) is refused: torch.load
runs the code a pickle holds, and transformers reads pytorch_model.bin whenever
model.safetensors is absent, even beside other *.safetensors files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.model.arch import DenseModelError, check_top_k, context_length, find_routers
from steerline.model.families import check_known_family


def load_causal_lm(path: str | Path, dtype: str = "float32",
                   device: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A local causal LM directory (safetensors) and its tokenizer, in eval mode, on `device`
    (None: `placement` from the weights' size and the GPUs' free memory)."""
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory {path} not found: run the build_models stage "
                                "or point params.yaml `model` / `dense_model` (or --model) at a "
                                "local checkpoint")
    check_weights(path)
    tokenizer = load_tokenizer(path)  # before the weights: the cheaper failure first
    if device is None:
        free = ([torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
                if torch.cuda.is_available() else [])
        device = placement(weight_count(path) * torch.empty((), dtype=getattr(torch, dtype))
                           .element_size(), free)
    if device == "auto":  # accelerate spreads the layers over the GPUs (then the host)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     use_safetensors=True, device_map="auto")
        return model.eval(), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 use_safetensors=True)
    model.to(device).eval()
    return model, tokenizer


# of a GPU's free memory the weights may take; the rest holds activations (a 4 x 256-token
# training batch of Qwen3-30B-A3B: a few GB) and the CUDA context
GPU_WEIGHT_SHARE = 0.85


def placement(weight_bytes: int, free_gpu_bytes: Sequence[int]) -> str:
    """Where a model of `weight_bytes` loads: "cpu" without a GPU, "cuda" (GPU 0) when it fits
    GPU_WEIGHT_SHARE of that GPU's free memory, else "auto" (accelerate's device_map: the
    layers spread over every GPU, and the host past them; Mixtral-8x7B's 93 GB of bfloat16
    weights on two 80 GB GPUs)."""
    if not free_gpu_bytes:
        return "cpu"
    return "cuda" if weight_bytes <= GPU_WEIGHT_SHARE * free_gpu_bytes[0] else "auto"


def weight_count(model_path: str | Path) -> int:
    """The number of weight values in a model directory's safetensors files, from their
    headers alone (the files are checked by check_weights first)."""
    total = 0
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with open(f, "rb") as handle:
            n = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


_REFETCH = ("copy the checkpoint again, or rerun the stage that wrote it (dvc repro "
            "build_models / finetune_experts)")
# safetensors' own limit on the JSON header (100 MB): a larger length is a corrupt prefix
_MAX_HEADER = 100_000_000
# Files one of which a transformers tokenizer directory holds (fast or slow tokenizers)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
# Suffixes of weight files read with pickle (torch.load), alone or before ".index.json" (the
# index of a sharded pytorch_model-0000x-of-0000n.bin checkpoint)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_safetensors(file: str | Path) -> None:
    """One ValueError naming `file` when it is not a complete safetensors file: the 8-byte
    header length, the JSON header and every tensor's byte range must lie inside the file.
    Reads only the header (the weights are not touched)."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        reason = None
        if n < 0:
            reason = f"{size} bytes, shorter than the 8-byte header length"
        elif n > min(size - 8, _MAX_HEADER):
            reason = f"header of {n} bytes in a file of {size}"
        else:
            try:
                header = json.loads(f.read(n))
                ends = [int(v["data_offsets"][1]) for k, v in header.items()
                        if k != "__metadata__"]
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                header, reason = None, "the JSON header does not parse"
            if header is not None and 8 + n + max(ends, default=0) > size:
                reason = (f"its tensors need {8 + n + max(ends)} bytes, the file has {size}")
    if reason is not None:
        raise ValueError(f"{file} is truncated or corrupt ({reason}): {_REFETCH}")


def check_weights(model_path: str | Path) -> None:
    """The safetensors weights of a model directory are all there and complete (sharded
    checkpoints: every shard of model.safetensors.index.json) and no pickle weight file lies
    beside them, before any weight is read."""
    path = Path(model_path)
    pickles = [f for f in sorted(path.glob("*"))
               if Path(f.name.removesuffix(".index.json")).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"{pickles[0]} is part of a pickle checkpoint: steerline loads "
                         "safetensors weights only (loading a pickle runs the code it holds): "
                         "convert the checkpoint to safetensors (save_pretrained(..., "
                         f"safe_serialization=True)) and remove {pickles[0].name} from {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is not a valid safetensors index (no weight_map): "
                             f"{_REFETCH}") from None
        files = [path / s for s in shards]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found (listed in {index.name}): {_REFETCH}")
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} has no model.safetensors (steerline loads "
                                    f"safetensors weights only): {_REFETCH}")
    for f in files:
        check_safetensors(f)


def load_tokenizer(model_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory (pad token = eos when it has none); a missing, empty
    or unreadable tokenizer is one ValueError naming the directory and the fix."""
    from transformers import AutoTokenizer

    path = Path(model_path)
    fix = (f"copy the tokenizer files of the checkpoint ({' or '.join(TOKENIZER_FILES[:2])}, "
           f"tokenizer_config.json) into {path}, or rerun build_models")
    present = [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    if not present:
        raise FileNotFoundError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)} all "
                                f"missing): {fix}")
    empty = [f for f in present if f.stat().st_size == 0]
    if empty:
        raise ValueError(f"{empty[0]} is empty: {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 (tokenizers' parse errors have no common type)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"the tokenizer in {path} does not load ({first}): {fix}") from None
    # a tokenizer built from nothing but its config has no vocabulary: every text encodes to []
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"the tokenizer in {path} encodes text to no tokens (an empty "
                         f"vocabulary): {fix}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_moe(model_path: str | Path, dtype: str = "float32", device: str | None = None):
    """MoE model (eval mode, on `device`: None = the GPU when there is one) + tokenizer from a
    local directory; a missing directory, a dense model or an unknown family is rejected from
    config.json before any weight is read."""
    moe_config(model_path)
    model, tokenizer = load_causal_lm(model_path, dtype, device=device)
    find_routers(model)  # DenseModelError with a clear message
    return model, tokenizer


def moe_config(model_path: str | Path) -> dict[str, int]:
    """(n_layers, n_experts, top_k) from a model directory's config.json, without loading any
    weight: a missing directory or config, a dense model or an MoE family steerline does not
    know is rejected before the (slow) load."""
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} not found: run the build_models stage "
                                "or point params.yaml `model` (or --model) at a local MoE "
                                "checkpoint")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: {path} is not a transformers model "
                                "directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as err:
        raise ValueError(f"{cfg_file} is not valid JSON ({err})") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    # the spellings of arch.moe_shape (DeepSeek: n_routed_experts)
    n_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get(
        "n_routed_experts")
    top_k = cfg.get("num_experts_per_tok")
    if not n_experts or not top_k:
        raise DenseModelError(
            f"{path} ({cfg.get('model_type', '?')}) is a dense model: this stage needs a "
            "Mixture-of-Experts model: point params.yaml `model` (or --model) at one, e.g. "
            "models/moe from build_models or an OLMoE / Qwen3-MoE / Mixtral checkpoint"
        )
    check_known_family(cfg.get("model_type"), str(cfg_file))
    check_top_k(int(n_experts), int(top_k), str(cfg_file))
    return {"n_layers": int(cfg.get("num_hidden_layers", 0)), "n_experts": int(n_experts),
            "top_k": int(top_k)}


def model_context(model_path: str | Path) -> int:
    """The positions of a model directory (config.json's max_position_embeddings), read
    without loading weights, so a command can apply check_context before the slow load."""
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: {model_path} is not a transformers "
                                "model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as err:
        raise ValueError(f"{cfg_file} is not valid JSON ({err})") from None
    return context_length(cfg if isinstance(cfg, dict) else {})
