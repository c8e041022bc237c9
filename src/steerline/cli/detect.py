"""`steerline detect`: the experts of an MoE whose routing differs between your own unsafe and
safe prompts, by the pipeline's own code: greedy answers with routing capture
(steermoe.routing.capture_model, as capture_routing), the prompt-level risk difference
(steermoe.detection.risk_diff.compute_risk_diff, as risk_diff: pooled contrast, permutation p /
BH q, bootstrap CIs) and the selection rule (steermoe.detection.select_experts, as
select_experts), written as an experts.json that `steerline generate --experts` and
finetune_experts read.

Params come from params.yaml's capture_routing / risk_diff / select_experts sections and `seed`
when run in the project (through the params schema; else its CliDefault values, the committed
params.yaml's), flags override.
The selection is on the pooled contrast only: your files carry no look-alike pairs (the matched
contrast of select_experts.require: matched / both needs prepare_safety's XSTest sources).

`--paired FILE` reads the SteerMoE original's paired chats instead of two prompt files
(steermoe.data.paired_chat: messages_0 / messages_1 with their target spans, `--messages-0`
naming messages_0's label); each chat runs teacher-forced and the default scope is `target`.

--out and --report are checked before any model is loaded and published together at the end
(both or neither). The capture works in a temporary folder steerline-detect-<pid>-*: SIGTERM
and SIGINT remove it on the way out, and a run removes those left by processes that are gone
(a SIGKILL runs no cleanup).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steerline.cli.common import (
    MODEL_DEFAULT,
    PARAMS,
    CliError,
    default_model,
    pipeline_params,
    require_file,
)

SCOPES = ("user", "generated", "all", "target")
# the work folder's name: this prefix, the owning process id, "-", tempfile's random part
WORK_PREFIX = "steerline-detect-"
TABLE_HEADER = ["side", "#", "layer", "expert", "risk_diff", "a_safe_n", "a_unsafe_n", "p_perm",
                "q_perm", "95% CI", "selected"]


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name, help="find the experts that route your unsafe vs safe prompts differently",
        description="Greedy answers to the prompts of --unsafe and --safe with routing capture, "
                    "then the pipeline's risk difference per (layer, expert) (prompt-level "
                    "permutation p / q, bootstrap CI) and its expert selection: prints the "
                    "ranking and writes an experts.json for `steerline generate --experts`.",
        epilog="example: steerline detect --unsafe unsafe.txt --safe safe.txt --top 10 --out "
               "my_experts.json   (files: .txt one prompt per line, or .csv / .jsonl / .parquet "
               "with a text column)")
    p.add_argument("--model", help=f"MoE model directory (default: {MODEL_DEFAULT})")
    p.add_argument("--unsafe", metavar="FILE", help="prompts of the behaviour to "
                   "find (.txt, .csv, .jsonl, .parquet)")
    p.add_argument("--safe", metavar="FILE", help="the reference prompts")
    p.add_argument("--paired", metavar="FILE", help="instead of --unsafe / --safe: the SteerMoE "
                   "original's paired chats (.jsonl / .parquet rows of messages_0, messages_1, "
                   "messages_0_target, messages_1_target), run teacher-forced")
    p.add_argument("--messages-0", choices=("unsafe", "safe"), dest="messages_0",
                   help="with --paired: the label of each row's messages_0 chat (messages_1 "
                   "gets the other)")
    p.add_argument("--text-column", default="text", metavar="NAME", help="the prompt column of "
                   ".csv / .jsonl / .parquet files (default: text)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="pairs per side in the "
                   "printed ranking (default 10)")
    p.add_argument("--out", default="experts.json", metavar="JSON", help="the selected experts "
                   "(default: experts.json)")
    p.add_argument("--report", metavar="PARQUET", help="also write the full risk_diff table "
                   "(read by `steerline experts --risk-diff`)")
    p.add_argument("--backend", default="transformers", help="transformers (the reference, "
                   "default) or vllm")
    p.add_argument("--scope", choices=SCOPES, help="tokens counted: the user's text, the "
                   "generated answer, all, or a paired chat's target span (default: target "
                   "with --paired, else params.yaml risk_diff.token_scope)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="answer length (default: "
                   "params.yaml capture_routing.max_new_tokens)")
    p.add_argument("--threshold", type=float, help="|risk_diff| an expert must exceed (default: "
                   "params.yaml select_experts.threshold)")
    p.add_argument("--alpha", type=float, help="largest prompt-level q-value selected (default: "
                   "params.yaml select_experts.alpha)")
    p.add_argument("--n-permutations", type=int, metavar="N", help="label shuffles of the "
                   "permutation test (default: params.yaml risk_diff.n_permutations)")
    p.add_argument("--p-method", choices=("fixed", "sequential"), dest="p_method",
                   help="sequential: pairs the shuffles leave unresolved draw on, up to "
                   "risk_diff.p_max_permutations (default: params.yaml risk_diff.p_method)")
    p.add_argument("--seed", type=int, help="permutations, bootstrap and generation (default: "
                   "params.yaml seed, else 0)")


def settings(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], int]:
    """(RiskDiff, SelectExperts, capture dict, seed): the pipeline's params (cli.common.
    pipeline_params) < flags, checked by the params schema (same ranges as the pipeline's)."""
    from pydantic import ValidationError

    from steerline.core.params import RiskDiff, SelectExperts

    params = pipeline_params()

    def section(name: str, flags: dict[str, Any]) -> dict[str, Any]:
        return {**params[name], **{k: v for k, v in flags.items() if v is not None}}

    capture = section("capture_routing", {"max_new_tokens": args.max_new_tokens})
    scope = args.scope or ("target" if getattr(args, "paired", None) else None)
    rd = section("risk_diff", {"token_scope": scope, "n_permutations": args.n_permutations,
                               "p_method": getattr(args, "p_method", None)})
    if rd["token_scope"] == "generated" and getattr(args, "paired", None):
        raise CliError("--paired chats run teacher-forced, so nothing is generated: use --scope "
                       "target (the default), user or all")
    if rd["token_scope"] == "target" and not getattr(args, "paired", None):
        raise CliError("--scope target counts the target spans of paired chats: give --paired "
                       "FILE, or another --scope")
    # your files carry no look-alike pairs: the pooled contrast only, whatever params.yaml says
    sel = section("select_experts", {"threshold": args.threshold, "alpha": args.alpha,
                                     "require": "pooled"})
    if capture["max_new_tokens"] < (1 if rd["token_scope"] == "generated" else 0):
        raise CliError("--scope generated needs --max-new-tokens >= 1")
    try:
        risk, select = RiskDiff(**rd), SelectExperts(**sel)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "value"
        raise CliError(f"{where}: {first['msg']} (a flag or {PARAMS})") from None
    seed = args.seed if args.seed is not None else params["seed"]
    return risk, select, capture, int(seed)


def min_p_value(n_unsafe: int, n_safe: int, n_permutations: int) -> float:
    """About the smallest p-value the label-permutation test can give: the observed labelling is
    one of C(n, n_unsafe) labellings, so about 1 / C(n, n_unsafe) of the shuffles match it (2 /
    C(n, n_unsafe) with as many prompts of each label: swapping the labels gives -risk_diff, as
    extreme for a two-sided test), and never below 1 / (1 + n_permutations)."""
    ties = 2 if n_unsafe == n_safe else 1
    return max(ties / math.comb(n_unsafe + n_safe, n_unsafe), 1.0 / (1 + n_permutations))


def prompts_needed(alpha: float, n_permutations: int) -> int | None:
    """The fewest prompts per label (as many of each) for which min_p_value <= alpha."""
    for n in range(1, 64):
        if min_p_value(n, n, n_permutations) <= alpha:
            return n
    return None


def ranking_rows(df, top: int, selection: dict[str, Any]) -> list[list[str]]:
    """The `top` highest (unsafe) and lowest (safe) risk_diff pairs as table rows."""
    from steerline.core.tables import fmt

    chosen = {side: {tuple(p) for p in selection[side]} for side in ("unsafe", "safe")}
    rows = []
    for side, ascending in (("unsafe", False), ("safe", True)):
        sub = df[df["risk_diff"] > 0] if side == "unsafe" else df[df["risk_diff"] < 0]
        sub = sub.sort_values(["risk_diff", "layer", "expert"], ascending=[ascending, True, True],
                              kind="stable").head(top)
        for rank, r in enumerate(sub.itertuples(), 1):
            ci = ("n/a" if math.isnan(r.ci_low) else f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]")
            rows.append([side, str(rank), str(r.layer), str(r.expert), fmt(r.risk_diff),
                         fmt(r.a_safe_n), fmt(r.a_unsafe_n), fmt(r.p_perm), fmt(r.q_perm), ci,
                         "yes" if (int(r.layer), int(r.expert)) in chosen[side] else ""])
    return rows


def check_destination(flag: str, path: Path, example: str) -> None:
    """A CliError unless `path` can be written at the end of the run: not a directory nor any
    other non-file, in a folder that exists and is writable or can be created (the nearest
    existing folder above it is writable)."""
    if path.is_dir():
        raise CliError(f"{flag} {path} is a directory: give a file name (e.g. {path / example})")
    if path.exists() and not path.is_file():
        raise CliError(f"{flag} {path} exists and is not a regular file: give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CliError(f"{flag} {path}: {folder} is not a folder: give a path in a folder")
    # a file made and removed, not os.access: root passes every access check, and a read-only
    # or special file system (/proc) refuses only the write itself
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise CliError(f"{flag} {path}: cannot write in {folder} ({err.strerror or err}): give "
                       "a path in a writable folder") from None


def remove_stale_work(root: Path) -> None:
    """Delete the work folders under `root` of detect runs whose process is gone (killed by
    SIGKILL or a power cut, which run no cleanup); those of live processes are kept."""
    from steerline.core.io import pid_alive

    for folder in root.glob(f"{WORK_PREFIX}*"):
        pid, sep, _ = folder.name[len(WORK_PREFIX):].partition("-")
        if sep and pid.isdigit() and not pid_alive(int(pid)) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise SystemExit(128 + signal) inside the block, so its `with` and
    `finally` cleanups run (SIGTERM's default ends the process on the spot); the previous
    handlers are put back after it. An ignored signal stays ignored, and off the main thread
    (where Python cannot install handlers) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():  # None: a handler not installed from Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def run(args: argparse.Namespace) -> None:
    with exit_on_signals():
        detect(args)


def detect(args: argparse.Namespace) -> None:
    from steerline.backends import BACKENDS
    from steerline.core.io import staged_outputs, write_json, write_parquet
    from steerline.model.arch import DenseModelError
    from steerline.model.fingerprint import FINGERPRINT_CACHE
    from steerline.model.load import moe_config
    from steerline.steermoe.data.paired_chat import paired_prompts
    from steerline.steermoe.data.prompt_files import labelled_prompts
    from steerline.steermoe.detection.expert_table import render
    from steerline.steermoe.detection.risk_diff import compute_risk_diff
    from steerline.steermoe.detection.select_experts import select_experts
    from steerline.steermoe.routing.capture import CaptureConfig
    from steerline.steermoe.routing.capture_model import capture_model

    if args.backend not in BACKENDS:
        raise CliError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.top < 1:
        raise CliError(f"--top must be >= 1, got {args.top}")
    out = Path(args.out)
    check_destination("--out", out, "experts.json")
    if args.report is not None:
        check_destination("--report", Path(args.report), "risk_diff.parquet")
        if Path(args.report).resolve() == out.resolve():
            raise CliError(f"--report {args.report} is also --out: give two file names")
    if args.paired is not None:
        if args.unsafe is not None or args.safe is not None:
            raise CliError("give --paired FILE or --unsafe FILE --safe FILE, not both")
        if args.messages_0 is None:
            raise CliError("--paired needs --messages-0 unsafe|safe: the label of each row's "
                           "messages_0 chat (the original's example: messages_0 safe)")
    elif args.unsafe is None or args.safe is None:
        raise CliError("give --unsafe FILE and --safe FILE (or --paired FILE --messages-0 "
                       "LABEL)")
    elif args.messages_0 is not None:
        raise CliError("--messages-0 labels the chats of --paired FILE: drop it, or give "
                       "--paired")
    risk, select, cap, seed = settings(args)
    # every input and destination is checked before the model is loaded, and nothing is
    # written before the end
    if args.paired is not None:
        prompts = paired_prompts(args.paired, args.messages_0)
    else:
        prompts = labelled_prompts(args.unsafe, args.safe, args.text_column,
                                   "name the prompt column with --text-column NAME")
    args.model = args.model or default_model()
    require_file(args.model, "the model directory", "run `dvc repro build_models` or pass "
                 "--model DIR")
    try:
        moe_config(args.model)
    except DenseModelError:
        raise CliError(f"{args.model} is a dense model: detect needs an MoE model (--model "
                       f"DIR; default: {MODEL_DEFAULT})") from None
    n_unsafe = int((prompts["label"] == "unsafe").sum())
    n_safe = len(prompts) - n_unsafe
    files = (f"{args.unsafe}), {n_safe} safe prompts ({args.safe}" if args.paired is None else
             f"{args.paired}), {n_safe} safe chats ({args.paired}")
    print(f"{n_unsafe} unsafe {'prompts' if args.paired is None else 'chats'} ({files}); "
          f"model {args.model} ({args.backend}), scope {risk.token_scope}, seed {seed}",
          file=sys.stderr)

    options = {"progress": False, "seed": seed} if args.backend == "vllm" else {}
    # the project's fingerprint cache only inside the project (never a tmp/ in a stranger's cwd)
    fingerprint_cache = FINGERPRINT_CACHE if PARAMS.is_file() else None
    config = CaptureConfig(cap["max_new_tokens"], cap["shard_prompts"])
    remove_stale_work(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{os.getpid()}-") as tmp:
        work = Path(tmp)
        capture_model(args.model, prompts, config, work / "routing", work / "generations.parquet",
                      work / "cache", backend=args.backend, dtype=cap["dtype"],
                      batch_size=cap["batch_size"], seed=seed, options=options,
                      fingerprint_cache=fingerprint_cache)
        # the risk_diff params are compute_risk_diff's keywords (as the risk_diff stage)
        df, meta = compute_risk_diff(work / "routing", **risk.model_dump(), seed=seed,
                                     progress=True, prompts=None)
    # select_experts logs each empty list; the lines below say it once, with what to do (the
    # logger's level is put back: a library caller of main keeps its logging as it was)
    quiet = logging.getLogger(select_experts.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        selection = select_experts(df, **select.model_dump(), meta=meta)
    finally:
        quiet.setLevel(level)
    print(f"risk difference P(expert | unsafe) - P(expert | safe) over {meta['n_tokens_unsafe']} "
          f"unsafe / {meta['n_tokens_safe']} safe {risk.token_scope} tokens; top {args.top} per "
          f"side (selected: risk_diff beyond +-{select.threshold} and q_perm <= {select.alpha})")
    print(render(TABLE_HEADER, ranking_rows(df, args.top, selection), markdown=False))
    shuffles = (risk.p_max_permutations if risk.p_method == "sequential"
                else risk.n_permutations)
    p_min = min_p_value(n_unsafe, n_safe, shuffles)
    if p_min > select.alpha:
        need = prompts_needed(select.alpha, shuffles)
        more = f"; at least {need} prompts per label make it possible" if need else ""
        print(f"too few prompts to reach significance: with {n_unsafe} unsafe and {n_safe} safe "
              f"prompts the smallest p-value the permutation test can give is {p_min:.3g} > alpha "
              f"{select.alpha}{more} (the ranking above is descriptive; its p_perm are Monte Carlo "
              f"estimates from {shuffles} shuffles, which can fall a little below "
              "that bound)")
    empty = [side for side in ("unsafe", "safe") if not selection[side]]
    if empty:
        top = [f"{int(r.layer)}:{int(r.expert)}" for r in df.sort_values(
            ["risk_diff", "layer", "expert"], ascending=[False, True, True], kind="stable"
        ).head(args.top).itertuples() if r.risk_diff > 0]
        # an empty list would make `generate --experts` fall back to the pipeline's ranking
        lists = "the unsafe and safe lists are" if len(empty) == 2 else f"the {empty[0]} list is"
        hint = (f"; to steer the unsafe ranking anyway: steerline generate --deactivate "
                f"{','.join(top)}" if "unsafe" in empty and top else "")
        print(f"no expert passes the selection on the {' and '.join(empty)} side, so {lists} "
              f"empty in {out}{hint}")
    with staged_outputs() as staging:  # both files or neither (a full disk, a kill)
        write_json(selection, staging(out))
        if args.report:
            write_parquet(df, staging(args.report), metadata=meta)
    print(f"wrote {out}: {len(selection['unsafe'])} unsafe and {len(selection['safe'])} safe "
          f"experts{f'; {args.report}' if args.report else ''}")
