"""`steerline generate`: greedy answers, steered by SteerMoE expert steering and/or MAT-Steer,
optionally beside the unsteered answers (--compare); any backend of steerline.backends."""

from __future__ import annotations

import argparse
import shutil
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from steerline.cli.common import (
    MODEL_DEFAULT,
    CliError,
    default_model,
    param_default,
    parse_pairs,
    require_file,
)

if TYPE_CHECKING:  # torch-heavy modules are imported when a command runs (fast --help)
    from steerline.steering.experts import SteeringPlan
    from steerline.steermoe.gating.prompt_gate import PromptGate

RISK_DIFF = Path("reports/risk_diff.parquet")  # fallback ranking for an empty experts.json list


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name, help="generate, steered (experts and/or MAT-Steer), optionally side by side",
        description="Greedy answers to --prompt, steered by SteerMoE expert steering (--activate "
                    "/ --deactivate pairs or --experts models/experts.json) and/or a MAT-Steer "
                    "checkpoint (--mat); --compare prints the unsteered answer beside it.",
        epilog="example: steerline generate --prompt 'How do I pick a lock?' --experts "
               "models/experts.json --mode deactivate_unsafe --compare")
    p.add_argument("--model", help=f"model directory (default: {MODEL_DEFAULT}; with only "
                                   "--mat, the checkpoint's own model)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="user text, sent through the chat template (repeat for a batch)")
    g = p.add_argument_group("expert steering (SteerMoE router rule; MoE models only)")
    g.add_argument("--activate", metavar="L:E,...", help="experts forced into every top-k")
    g.add_argument("--deactivate", metavar="L:E,...", help="experts kept out of every top-k")
    g.add_argument("--experts", metavar="JSON", help="models/experts.json from select_experts "
                   "(instead of --activate / --deactivate)")
    g.add_argument("--mode", help="with --experts: deactivate_unsafe, activate_safe or both "
                   "(default: params.yaml expert_steering.mode)")
    g.add_argument("--n-experts", type=int, metavar="N", help="with --experts: the first N of "
                   "each list (default: params.yaml expert_steering.n_experts)")
    g.add_argument("--delta", type=float, help="score margin of the rule (default: params.yaml "
                   "expert_steering.delta)")
    g.add_argument("--on-empty-selection", choices=("error", "risk_diff_ranking"),
                   help="with --experts, a list the mode needs is empty: error, or steer the top "
                   "of reports/risk_diff.parquet (default: params.yaml "
                   "expert_steering.on_empty_selection)")
    g.add_argument("--gate", metavar="DIR", help="a train_gate folder (models/gate for "
                   "params.yaml's `model`): steer only the prompts its gate fires on, the rest "
                   "unsteered")
    g.add_argument("--gate-source", default="residual", choices=("residual", "routing"),
                   help="with --gate: which of its gates (default: residual)")
    p.add_argument("--mat", metavar="DIR", help="MAT-Steer checkpoint (models/mat_steer from "
                   "train_steering): gated steering of the residual stream")
    p.add_argument("--backend", default="transformers", help="generation engine: transformers "
                   "(the reference, default) or vllm")
    p.add_argument("--compare", action="store_true",
                   help="print the unsteered answer beside the steered one")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")


def expert_plan(args: argparse.Namespace, model: str) -> SteeringPlan | None:
    """The expert steering plan the flags ask for (None when none), checked against the model's
    config before any weight is loaded."""
    import pandas as pd

    from steerline.model.arch import DenseModelError
    from steerline.model.load import moe_config
    from steerline.steering.experts import MODES, SteeringPlan, read_experts_json
    from steerline.steermoe.safety.steering_plan import selection_plan
    pairs = args.activate is not None or args.deactivate is not None
    if args.experts is not None and pairs:
        raise CliError("give either --experts or --activate/--deactivate, not both")
    if args.experts is None and (args.mode is not None or args.n_experts is not None
                                 or args.on_empty_selection is not None):
        raise CliError("--mode, --n-experts and --on-empty-selection select from a list: add "
                       "--experts models/experts.json")
    if args.experts is None and not pairs:
        if args.delta is not None:
            raise CliError("--delta applies to expert steering: add --activate, --deactivate "
                           "or --experts")
        return None
    try:
        shape = moe_config(model)
    except DenseModelError:
        raise CliError(f"{model} is a dense model: expert steering needs an MoE model (--model "
                       f"DIR; default: {MODEL_DEFAULT}); use --mat for activation steering"
                       ) from None
    delta = float(param_default(args.delta, "expert_steering", "delta", "--delta"))
    if pairs:
        activate = parse_pairs(args.activate, "--activate") if args.activate else ()
        deactivate = parse_pairs(args.deactivate, "--deactivate") if args.deactivate else ()
        plan = SteeringPlan(activate, deactivate, delta, {"experts": "command line"})
        plan.validate(shape["n_layers"], shape["n_experts"], shape["top_k"])
        return plan
    path = require_file(args.experts, "the selected experts",
                        "run `dvc repro select_experts` or pass another --experts file")
    mode = param_default(args.mode, "expert_steering", "mode", "--mode")
    if mode not in MODES:
        raise CliError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    n = int(param_default(args.n_experts, "expert_steering", "n_experts", "--n-experts"))
    # the pipeline's rule (eval_safety): an empty list is an error unless on_empty_selection
    # says to steer the raw risk_diff ranking
    on_empty = param_default(args.on_empty_selection, "expert_steering", "on_empty_selection",
                             "--on-empty-selection")

    def ranking() -> pd.DataFrame:
        require_file(RISK_DIFF, "the risk_diff ranking on_empty_selection falls back on",
                     "run `dvc repro risk_diff` or set --on-empty-selection error")
        return pd.read_parquet(RISK_DIFF)

    return selection_plan(read_experts_json(path), mode, n, delta, on_empty, ranking,
                          shape["n_layers"], shape["n_experts"], shape["top_k"])


def describe(plan: SteeringPlan | None, mat: str | None, layer: int | None) -> str:
    parts = []
    if plan is not None:
        src = ", ".join(f"{k}: {v}" for k, v in sorted(plan.source.items()))
        parts.append(f"experts: activate {len(plan.activate)}, deactivate {len(plan.deactivate)} "
                     f"(delta {plan.delta}; {src})")
    if mat is not None:
        parts.append(f"MAT-Steer {mat} at layer {layer}")
    return "; ".join(parts) or "none"


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int) -> str:
    """Two texts in columns of (width - 3) // 2 characters, wrapped, with titles."""
    col = max(20, (width - 3) // 2)
    wl = textwrap.wrap(left, col) or [""]
    wr = textwrap.wrap(right, col) or [""]
    rows = [f"{titles[0]:<{col}} | {titles[1]}", f"{'-' * col}-+-{'-' * col}"]
    for i in range(max(len(wl), len(wr))):
        a = wl[i] if i < len(wl) else ""
        b = wr[i] if i < len(wr) else ""
        rows.append(f"{a:<{col}} | {b}".rstrip())
    return "\n".join(rows)


def gate_scores(gate: PromptGate, model: str, prompts: list[str], dtype: str) -> list[float]:
    """Each prompt's gate score from one unsteered prefill of `model` (the answer_safety
    stages' scoring)."""
    from steerline.model.gpu import free_gpu
    from steerline.model.load import load_moe
    from steerline.steermoe.gating.scoring import score_prompts

    hf, tok = load_moe(model, dtype)
    scores, _ = score_prompts({gate.source: gate}, hf, tok, prompts, batch_size=8)[gate.source]
    del hf  # on a GPU: its memory goes back before the vLLM engine sizes its KV cache
    free_gpu()
    return [float(x) for x in scores]


def run(args: argparse.Namespace) -> None:
    from steerline.backends import BACKENDS, ActivationSteering, Steering, make_backend
    from steerline.core.chat import is_blank, render_chat
    from steerline.mat_steer.checkpoint import load_steering
    from steerline.model.load import check_weights, load_tokenizer, model_context
    from steerline.steering.capture import check_context
    from steerline.steermoe.gating.prompt_gate import load_gate

    if args.backend not in BACKENDS:
        raise CliError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for text in args.prompt:
        if is_blank(text):  # whitespace or control characters only (e.g. "\x00")
            raise CliError("--prompt is empty: give the user text to answer")
    mat_layer, activation = None, None
    if args.mat is not None:
        require_file(args.mat, "the MAT-Steer checkpoint",
                     "run `dvc repro train_steering` or pass another --mat directory")
        module, config = load_steering(args.mat)
        activation = ActivationSteering(config.layer, module=module)
        mat_layer = config.layer
        model = args.model or (config.model if args.experts is None and args.activate is None
                               and args.deactivate is None else default_model())
    else:
        model = args.model or default_model()
    require_file(model, "the model directory",
                 "run `dvc repro build_models` or pass --model DIR")
    plan = expert_plan(args, model)
    steering = None if plan is None and activation is None else Steering(plan, activation)
    if args.compare and steering is None:
        raise CliError("--compare needs something to compare: add --activate / --deactivate, "
                       "--experts or --mat")

    gate = None
    if args.gate is not None:
        if steering is None:
            raise CliError("--gate decides which prompts are steered: add --activate / "
                           "--deactivate, --experts or --mat")
        require_file(args.gate, "the gate folder",
                     "run `dvc repro train_gate` or pass another --gate")
        gate = load_gate(args.gate, args.gate_source)  # a corrupt gate: before the model load

    # weights, tokenizer and the context rule are checked before the (slow) model load
    check_weights(model)
    tok = load_tokenizer(model)
    chats = [render_chat(tok, p) for p in args.prompt]
    check_context(chats, [f"--prompt {i + 1}" for i in range(len(chats))], args.max_new_tokens,
                  model_context(model))
    steered = [steering] * len(chats)
    gate_note = [""] * len(chats)
    if gate is not None:
        threshold = gate.threshold
        scores = gate_scores(gate, str(model), args.prompt, args.dtype)
        steered = [steering if sc >= threshold else None for sc in scores]
        gate_note = [f" (gate {args.gate_source}: {sc:.3f} "
                     f"{'>=' if sc >= threshold else '<'} {threshold:.3f}, "
                     f"{'steered' if sc >= threshold else 'not steered'})" for sc in scores]
    options = {"progress": False} if args.backend == "vllm" else {}
    with make_backend(args.backend, str(model), dtype=args.dtype,
                      batch_size=max(1, 2 * len(args.prompt)), **options) as backend:
        plans = ([None] * len(chats) if args.compare else []) + steered
        outs = backend.generate(chats * (2 if args.compare else 1), args.max_new_tokens, plans)
    texts = [tok.decode(o.token_ids.tolist(), skip_special_tokens=True).strip() for o in outs]
    width = shutil.get_terminal_size((100, 24)).columns
    print(f"model: {model} ({args.backend}); steering: {describe(plan, args.mat, mat_layer)}")
    n = len(chats)
    for i, prompt in enumerate(args.prompt):
        print(f"\n[{i + 1}] {prompt}{gate_note[i]}")
        if args.compare:
            print(side_by_side(texts[i], texts[n + i], ("unsteered", "steered"), width))
        else:
            print(texts[i])
