"""`steerline serve`: an OpenAI-compatible server on vLLM, steered per request
(steerline.serve); the artifacts a request may apply are given here."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from steerline.cli.common import (
    MODEL_DEFAULT,
    CliError,
    default_model,
    params_section,
    require_file,
)
from steerline.cli.generate import RISK_DIFF

if TYPE_CHECKING:  # the server stack (vLLM, uvicorn) loads when the command runs (fast --help)
    from steerline.serve.server import ServeConfig


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name, help="serve the model over an OpenAI-compatible API, steered per request",
        description="An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, "
                    "/v1/models, streaming) on vLLM. Each request may steer by the body's "
                    "`steering` object (the openai client's extra_body): experts from --experts "
                    "or explicit lists, MAT-Steer attributes from --mat, the --gate; see "
                    "docs/serve.md.",
        epilog="example: steerline serve --experts models/experts.json "
               "--mat models/mat_steer --gate models/gate --port 8000")
    p.add_argument("--model", help=f"model directory (default: {MODEL_DEFAULT})")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send (default: --model as given)")
    p.add_argument("--experts", metavar="JSON", help="models/experts.json: requests may steer "
                   "by mode / n / delta")
    p.add_argument("--mat", metavar="DIR", help="MAT-Steer checkpoint (models/mat_steer): "
                   "requests may steer by its attributes")
    p.add_argument("--gate", metavar="DIR", help="a train_gate folder (models/gate): requests "
                   "may ask to be steered only when its gate fires")
    p.add_argument("--steering", metavar="JSON", help="the `steering` object of requests that "
                   "send none, e.g. '{\"experts\": {\"mode\": \"activate_safe\"}}' (for "
                   "clients that cannot add a field, such as an evaluation harness)")
    g = p.add_argument_group("defaults for requests that leave them out (else params.yaml "
                             "expert_steering)")
    g.add_argument("--mode", help="deactivate_unsafe, activate_safe or both")
    g.add_argument("--n-experts", type=int, metavar="N")
    g.add_argument("--delta", type=float)
    g.add_argument("--on-empty-selection", choices=("error", "risk_diff_ranking"))
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="port (default: 8000; 0: a free one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--max-num-seqs", type=int, metavar="N",
                   help="requests vLLM runs in one batch (default: vLLM's)")


def config(args: argparse.Namespace) -> ServeConfig:
    """The server's configuration from the flags and params.yaml, artifacts checked to exist."""
    from steerline.serve.artifacts import ExpertDefaults
    from steerline.serve.server import DEFAULT_HOST, DEFAULT_PORT, ServeConfig

    args.model = args.model or default_model()
    require_file(args.model, "the model directory", "run `dvc repro build_models` or pass "
                 "--model DIR")
    for path, what, stage in ((args.experts, "the selected experts", "select_experts"),
                              (args.mat, "the MAT-Steer checkpoint", "train_steering"),
                              (args.gate, "the gate folder", "train_gate")):
        if path is not None:
            require_file(path, what, f"run `dvc repro {stage}` or leave the flag out")
    port = DEFAULT_PORT if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise CliError(f"--port must be in 0..65535, got {port}")
    if args.max_num_seqs is not None and args.max_num_seqs < 1:
        raise CliError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    params = params_section("expert_steering")
    n = args.n_experts if args.n_experts is not None else params.get("n_experts")
    delta = args.delta if args.delta is not None else params.get("delta")
    try:
        defaults = ExpertDefaults(
            mode=args.mode or params.get("mode"), n=None if n is None else int(n),
            delta=None if delta is None else float(delta),
            on_empty=args.on_empty_selection or params.get("on_empty_selection", "error"),
            risk_diff=RISK_DIFF)
    except ValueError as err:
        raise CliError(str(err)) from None
    steering = None
    if args.steering is not None:
        try:
            steering = json.loads(args.steering)
        except json.JSONDecodeError as err:
            raise CliError(f"--steering is not valid JSON ({err.msg} at character {err.pos}): "
                           "give an object such as '{\"mat_steer\": {}}'") from None
    options = {} if args.max_num_seqs is None else {"max_num_seqs": args.max_num_seqs}
    return ServeConfig(model=args.model, name=args.served_model_name, experts=args.experts,
                       mat=args.mat, gate=args.gate, defaults=defaults, dtype=args.dtype,
                       host=args.host or DEFAULT_HOST, port=port, vllm_options=options,
                       default_steering=steering)


def run(args: argparse.Namespace) -> None:
    from steerline.serve.server import Server

    cfg = config(args)
    server = Server(cfg)
    loaded = ", ".join(server.service.artifacts.names) or "explicit expert lists only"
    print(f"steerline serve: {cfg.name or cfg.model} on http://{cfg.host}:{cfg.port}/v1 "
          f"(steering: {loaded}; Ctrl-C stops)", file=sys.stderr, flush=True)
    server.run()
