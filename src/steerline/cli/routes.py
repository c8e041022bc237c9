"""`steerline routes`: which experts each token of a prompt and of the model's greedy answer
takes, as a compact terminal heat map (optionally under expert steering)."""

from __future__ import annotations

import argparse

import numpy as np

from steerline.cli.common import (
    MODEL_DEFAULT,
    CliError,
    default_model,
    param_default,
    parse_pairs,
    require_file,
)

SHADES = " .:-=+*#%@"  # share of tokens: 0 -> ' ', all -> '@'
TOKEN_WIDTH = 14


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name, help="the experts each token of a prompt and its answer is routed to",
        description="Greedy answer to --prompt with routing capture: per token the top-1 expert "
                    "of every MoE layer, then a layer x expert heat map of the share of tokens "
                    "routed to each expert (top-k).")
    p.add_argument("--model", help=f"MoE model directory (default: {MODEL_DEFAULT})")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="user text")
    p.add_argument("--max-new-tokens", type=int, default=24, metavar="N")
    p.add_argument("--backend", default="transformers", help="transformers (default) or vllm")
    p.add_argument("--tokens", choices=("all", "user", "answer"), default="all",
                   help="tokens counted in the heat map (user = the prompt's own text)")
    p.add_argument("--activate", metavar="L:E,...", help="route under expert steering")
    p.add_argument("--deactivate", metavar="L:E,...", help="route under expert steering")
    p.add_argument("--delta", type=float, help="steering margin (default: params.yaml "
                   "expert_steering.delta)")


def token_label(tok, token_id: int) -> str:
    text = tok.decode([int(token_id)]).replace("\n", "\\n").replace("\t", "\\t")
    return (text if text.strip() else repr(text))[:TOKEN_WIDTH]


def top1_table(tok, ids: np.ndarray, experts: np.ndarray, generated: np.ndarray,
               top_k: int, n_experts: int) -> list[str]:
    """One line per token: its text, '*' for an answer token, the top-1 expert of each layer."""
    n_layers = experts.shape[1] // top_k
    w = len(str(n_experts - 1))
    head = " " * (TOKEN_WIDTH + 2) + " ".join(f"{layer:>{w}}" for layer in range(n_layers))
    lines = [f"top-1 expert per layer (columns: MoE layers 0..{n_layers - 1}; * = answer token)",
             head]
    first = experts.reshape(len(ids), n_layers, top_k)[:, :, 0]  # [n, L] highest weight
    for i, token in enumerate(ids):
        mark = "*" if generated[i] else " "
        cells = " ".join(f"{int(e):>{w}}" for e in first[i])
        lines.append(f"{token_label(tok, token):<{TOKEN_WIDTH}}{mark} {cells}")
    return lines


def heat_map(experts: np.ndarray, keep: np.ndarray, top_k: int, n_experts: int) -> list[str]:
    """Rows = layers, columns = experts; shade = share of the kept tokens whose top-k holds the
    expert at that layer."""
    n_layers = experts.shape[1] // top_k
    ex = experts[keep].reshape(-1, n_layers, top_k)  # [n, L, k]
    counts = np.zeros((n_layers, n_experts))
    for layer in range(n_layers):
        counts[layer] = np.bincount(ex[:, layer].ravel(), minlength=n_experts)[:n_experts]
    share = counts / max(1, len(ex))  # [L, E] in [0, 1]
    idx = np.minimum((share * (len(SHADES) - 1)).round().astype(int), len(SHADES) - 1)
    ruler = "".join(str(e % 10) for e in range(n_experts))
    lines = [f"share of {len(ex)} tokens routed to each expert (rows: layers; columns: experts "
             f"0..{n_experts - 1}; '{SHADES[0]}' none .. '{SHADES[-1]}' all)",
             f"      {ruler}"]
    for layer in range(n_layers):
        lines.append(f"L{layer:>3} |{''.join(SHADES[i] for i in idx[layer])}|")
    return lines


def run(args: argparse.Namespace) -> None:
    from steerline.backends import BACKENDS, Steering, make_backend
    from steerline.core.chat import is_blank, render_chat
    from steerline.model.arch import DenseModelError
    from steerline.model.load import check_weights, load_tokenizer, model_context, moe_config
    from steerline.steering.capture import check_context
    from steerline.steering.experts import SteeringPlan

    if args.backend not in BACKENDS:
        raise CliError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if is_blank(args.prompt):  # whitespace or control characters only (e.g. "\x00")
        raise CliError("--prompt is empty: give the user text to route")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    args.model = args.model or default_model()
    require_file(args.model, "the model directory", "run `dvc repro build_models` or pass "
                 "--model DIR")
    try:
        shape = moe_config(args.model)
    except DenseModelError:
        raise CliError(f"{args.model} is a dense model: routes needs an MoE model (--model "
                       f"DIR; default: {MODEL_DEFAULT})") from None
    steering = None
    if args.activate or args.deactivate:
        activate = parse_pairs(args.activate, "--activate") if args.activate else ()
        deactivate = parse_pairs(args.deactivate, "--deactivate") if args.deactivate else ()
        delta = float(param_default(args.delta, "expert_steering", "delta", "--delta"))
        plan = SteeringPlan(activate, deactivate, delta, {"experts": "command line"})
        plan.validate(shape["n_layers"], shape["n_experts"], shape["top_k"])
        steering = Steering(experts=plan)
    # weights, tokenizer and the context rule are checked before the (slow) model load
    check_weights(args.model)
    tok = load_tokenizer(args.model)
    chat = render_chat(tok, args.prompt)
    check_context([chat], ["--prompt"], args.max_new_tokens, model_context(args.model))
    options = {"progress": False} if args.backend == "vllm" else {}
    with make_backend(args.backend, args.model, batch_size=1, **options) as backend:
        routed = backend.generate_and_capture([chat], args.max_new_tokens, steering)[0]
    k, e = shape["top_k"], shape["n_experts"]
    user = ~routed.is_template & ~routed.is_generated
    keep = {"all": np.ones(len(routed.token_ids), bool), "user": user,
            "answer": routed.is_generated.astype(bool)}[args.tokens]
    answer = tok.decode(routed.token_ids[routed.n_prompt:].tolist(), skip_special_tokens=True)
    print(f"model {args.model} ({args.backend}): {shape['n_layers']} MoE layers, top-{k} of {e} "
          f"experts{'; steered' if steering else ''}")
    print(f"prompt {routed.n_prompt} tokens ({int(user.sum())} of the user's text), answer "
          f"{routed.n_generated} tokens: {answer.strip()!r}\n")
    print("\n".join(top1_table(tok, routed.token_ids, routed.experts, routed.is_generated, k, e)))
    print()
    print("\n".join(heat_map(routed.experts, keep, k, e)))
