"""Generate text with a trained MAT-Steer checkpoint applied (transformers backend).

Library: `generate(model, tokenizer, prompts, module, config)`; the hook lives only inside
`mat_steering(...)` and is removed on exit, also on errors. CLI:

    python -m steerline.mat_steer.generate --prompt "How do vaccines work?" [--prompt ...]
        [--model models/base] [--steering models/mat_steer] [--no-steer] [--compare]
        [--max-new-tokens 64] [--no-chat]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.mat_steer.hooks import mat_steering
from steerline.mat_steer.module import SteeringConfig, SteeringModule, load_steering
from steerline.model.load import load_causal_lm


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   chat: bool = True) -> list[str]:
    """Wrap each prompt in the chat template (one user turn) when the tokenizer has one."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             module: SteeringModule | None = None, config: SteeringConfig | None = None,
             max_new_tokens: int = 64, chat: bool = True, **gen_kwargs: object) -> list[str]:
    """Greedy continuations of `prompts` (batched, left-padded), steered when `module` is given.

    The steering hook edits every token of every sequence at the checkpoint's layer: the prompt
    tokens in the first forward and each new token afterwards."""
    if not prompts:
        return []
    if (module is None) != (config is None):
        raise ValueError("pass both the steering module and its config, or neither")
    texts = render_prompts(tokenizer, prompts, chat)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tokenizer.padding_side = old_side
    enc = enc.to(next(model.parameters()).device)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id, **gen_kwargs}
    ctx = (mat_steering(model, module, config) if module is not None
           else contextlib.nullcontext())
    with ctx:
        out = model.generate(**enc, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m steerline.mat_steer.generate",
                                 description="Generate with MAT-Steer steering applied.")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--model", default=None, help="model dir (default: the checkpoint's model)")
    ap.add_argument("--steering", default="models/mat_steer", help="checkpoint directory")
    ap.add_argument("--no-steer", action="store_true", help="generate without steering")
    ap.add_argument("--compare", action="store_true", help="print unsteered and steered")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    try:
        module, config = load_steering(args.steering)
        model, tokenizer = load_causal_lm(args.model or config.model, args.dtype)
        runs = []
        if args.no_steer or args.compare:
            runs.append(("unsteered", None, None))
        if not args.no_steer:
            runs.append(("mat_steer", module, config))
        for name, mod, cfg in runs:
            outs = generate(model, tokenizer, args.prompt, mod, cfg, args.max_new_tokens,
                            chat=not args.no_chat)
            for prompt, text in zip(args.prompt, outs, strict=True):
                print(f"[{name}] {prompt}\n{text.strip()}\n")
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"generate: {err}")


if __name__ == "__main__":
    main()
