"""Running a stage script: a user error ends in one line, a bug in a traceback.

    if __name__ == "__main__":
        run_stage(main)

User errors are what the user fixes in their inputs, params or environment: ValueError (bad
data or params; pydantic's ValidationError and DenseModelError are ValueErrors),
FileNotFoundError / NotADirectoryError / IsADirectoryError (a missing model or input),
PermissionError, and UserError (anything else a stage wants reported that way). The message
must say what to fix; it is printed on one line, prefixed with the stage name, exit status 1.
Anything else (KeyError, TypeError, RuntimeError, ...) is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """An error in the user's inputs, params or environment (reported on one line)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
    PermissionError,
)


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line messages joined with '; ')."""
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def run_stage(main: Callable[[], object], name: str | None = None) -> None:
    """Call `main()`; a user error exits with status 1 and one line on stderr."""
    stage = name or Path(sys.argv[0]).stem
    try:
        main()
    except USER_ERRORS as err:
        raise SystemExit(f"{stage}: {one_line(err)}") from None
