"""The `steerline` command (pyproject console script): what a researcher reaches for.

    steerline generate --prompt "..." --experts models/experts.json --compare
    steerline experts --top 10 [--contrast matched]
    steerline routes --prompt "..."
    steerline detect --unsafe unsafe.txt --safe safe.txt --out experts.json
    steerline stages
    steerline serve --experts models/experts.json --port 8000

The MoE commands default to params.yaml's `model` (cli.common.default_model).

Bad input ends with one line on stderr saying what to fix (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from steerline.cli import detect, experts, generate, routes, serve, stages
from steerline.cli.common import CliError
from steerline.cli.terminal import escape_controls, escaped_stdout
from steerline.core.errors import UserError, one_line

COMMANDS = {"generate": generate, "experts": experts, "routes": routes, "detect": detect,
            "serve": serve, "stages": stages}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="steerline",
        description="Steer and inspect MoE / dense language models with the steerline pipeline's "
                    "outputs (run from the project root; paths default to the pipeline's).")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub, name)
    return ap


def quiet_progress() -> None:
    """No progress bars on a terminal command's output (tqdm's and transformers' own)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "routes", "serve"):
        quiet_progress()
    try:
        with escaped_stdout():  # prompts, answers and tokens are user and model text
            COMMANDS[args.command].run(args)
    except BrokenPipeError:  # `steerline experts | head` (an OSError: caught first)
        return 0
    except (CliError, UserError, ValueError, OSError, RuntimeError) as err:
        # UserError: the library's own (a prompt file, a prompt render_chat refuses, a corrupt
        # model); its ValueErrors already say what to fix (DenseModelError is a ValueError);
        # OSError: a file that is missing, unreadable or unwritable, named by one_line. The
        # message may quote a prompt: escaped like stdout.
        print(f"steerline {args.command}: error: {escape_controls(one_line(err))}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
