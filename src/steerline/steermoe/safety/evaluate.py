"""One variant evaluated in process, end to end: greedy answers (steermoe.safety.generation),
verdicts and refusal rates (verdicts), and the benign perplexity (perplexity), with the steering
hook, when given, active for every prompt, generated token and scored answer.

No stage calls it: the pipeline splits the same work across stages (answer_safety generates and
scores through a backend, eval_safety judges and compares); the tests use it as the whole
evaluation of one variant in one call.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn
from transformers import PreTrainedTokenizerBase

from steerline.steering.experts import SteeringPlan, expert_steering
from steerline.steermoe.safety.generation import greedy_answers
from steerline.steermoe.safety.perplexity import answer_nll
from steerline.steermoe.safety.refusal import RefusalJudge
from steerline.steermoe.safety.verdicts import answer_frame, refusal_metrics


def evaluate_variant(
    name: str,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: pd.DataFrame,
    judge: RefusalJudge,
    max_new_tokens: int,
    batch_size: int,
    plan: SteeringPlan | None = None,
    reference: pd.DataFrame | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics and per-prompt answers of one model (steered by `plan` when given). `reference`
    (text, answer) = the benign answers whose perplexity is the capability check; None = this
    variant's own answers to the safe prompts (the base row)."""
    with expert_steering(model, plan or SteeringPlan()):  # an empty plan hooks nothing
        answers = greedy_answers(model, tokenizer, prompts["text"].tolist(), max_new_tokens,
                                 batch_size, desc=f"{name} generate")
        frame = answer_frame(name, prompts, answers, judge)
        metrics = refusal_metrics(frame)
        ref = reference if reference is not None else frame[frame["label"] == "safe"]
        nll, n_tok = answer_nll(model, tokenizer, ref["text"].tolist(), ref["answer"].tolist(),
                                batch_size, desc=f"{name} perplexity")
        metrics["ppl_benign"] = float(np.exp(nll / n_tok))
    metrics["mean_answer_tokens"] = float(frame["n_generated"].mean())
    return metrics, frame
