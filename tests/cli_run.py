"""Running the `steerline` command in-process and checking its one-line errors."""

from __future__ import annotations

from steerline.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `steerline ARGV`."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, needle: str) -> str:
    """The single stderr line, which holds `needle` and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]
