"""Stage build_models: the wheel's GGUF -> the dense model and its MoEfied Mixture-of-Experts
(Qwen2-MoE layout), with the MoE's fidelity to the dense model as DVC metrics."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from steerline.core.chat import render_chat
from steerline.core.io import staged_outputs, write_json, write_timings
from steerline.core.params import Params
from steerline.model.gguf import find_gguf, load_gguf_dense, save_model
from steerline.model.moefy import MoeSpec, fidelity, greedy_answers, moefy


@dataclass(frozen=True)
class Inputs:
    questions: Path  # TruthfulQA questions: calibration and held-out evaluation prompts


@dataclass(frozen=True)
class Outputs:
    base: Path  # the dense model (safetensors)
    moe: Path  # the MoE (safetensors)
    metrics: Path  # fidelity metrics (JSON)
    samples: Path  # a few greedy answers of both models (JSON)


def main(params: Params, inputs: Inputs, out: Outputs) -> None:
    p = params.build_models
    torch.manual_seed(params.seed)
    t0 = time.time()
    dense, tokenizer = load_gguf_dense(find_gguf(p.gguf_package, p.gguf_file))
    # Calibration and held-out evaluation prompts: disjoint TruthfulQA questions.
    questions = [q["question"] for q in json.loads(inputs.questions.read_text())]
    random.Random(params.seed).shuffle(questions)
    n_cal, n_eval = p.calib_prompts, p.eval_prompts
    if n_cal + n_eval > len(questions):
        raise ValueError(f"calib_prompts + eval_prompts > {len(questions)} available questions")
    chats = [render_chat(tokenizer, q).ids for q in questions[: n_cal + n_eval]]
    seqs = greedy_answers(dense, chats, p.calib_new_tokens, tokenizer.pad_token_id, p.batch_size)
    spec = MoeSpec(p.n_experts, p.top_k, p.shared_fraction, p.router_tau, p.ridge_alpha,
                   p.refit_lambda, params.seed)
    moe = moefy(dense, seqs[:n_cal], spec, p.calib_tokens)
    eval_seqs = seqs[n_cal:]
    fid = fidelity(dense, moe, eval_seqs)
    # Greedy answers of both models on the held-out prompts (sanity of the MoE's text).
    eval_prompts = chats[n_cal:]
    moe_seqs = greedy_answers(moe, eval_prompts, p.calib_new_tokens, tokenizer.pad_token_id,
                              p.batch_size)
    same = [a == b for a, b in zip(seqs[n_cal:], moe_seqs, strict=True)]
    metrics = {
        "n_experts": p.n_experts,
        "top_k": p.top_k,
        "active_fraction": round(spec.active_fraction(dense.config.intermediate_size), 4),
        "top1_agreement": round(fid["top1_agreement"], 4),
        "mean_kl": round(fid["mean_kl"], 4),
        "greedy_answer_exact_match": round(sum(same) / len(same), 4),
        "eval_positions": fid["positions"],
    }
    samples = [
        {
            "question": q,
            "dense": tokenizer.decode(d[len(c):], skip_special_tokens=True),
            "moe": tokenizer.decode(m[len(c):], skip_special_tokens=True),
        }
        for q, c, d, m in zip(questions[n_cal : n_cal + 8], eval_prompts, seqs[n_cal:], moe_seqs,
                              strict=False)
    ]
    with staged_outputs() as staged:  # both models and both reports, or none of them
        save_model(dense, tokenizer, staged.dir(out.base))
        save_model(moe, tokenizer, staged.dir(out.moe))
        write_json(samples, staged(out.samples))
        write_json(metrics, staged(out.metrics))
    write_timings("build_models", {"build_seconds": time.time() - t0})  # not a DVC output
    print(json.dumps(metrics, indent=2))
