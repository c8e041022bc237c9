"""Terminal escapes in user or model text: the `steerline` command prints them escaped, on
stdout (prompts, answers, tokens) and in its error line (a file name), never raw."""

from __future__ import annotations

import sys

import pytest

from steerline.cli import COMMANDS, main
from steerline.cli.terminal import escape_controls, escaped_stdout

CLEAR, TITLE, BIDI = "\x1b[2J", "\x1b]0;pwned\x07", "\u202e"
HOSTILE = f"Hi{CLEAR}{TITLE} there{BIDI}"


def raw_controls(text: str) -> set[str]:
    return {c for c in text if c in "\x1b\x07\x9b\u202e"}


def test_escape_controls_keeps_text_newlines_and_tabs():
    assert escape_controls(HOSTILE) == "Hi\\x1b[2J\\x1b]0;pwned\\x07 there\\u202e"
    assert escape_controls("a\tb\nc é 中 \U0001f600") == "a\tb\nc é 中 \U0001f600"
    assert escape_controls("\r\x00\x7f\x9b") == "\\x0d\\x00\\x7f\\x9b"


def test_escaped_stdout_is_restored_after_an_error(capsys):
    before = sys.stdout
    with pytest.raises(RuntimeError), escaped_stdout():
        print(CLEAR)
        raise RuntimeError
    assert sys.stdout is before and capsys.readouterr().out == "\\x1b[2J\n"


@pytest.mark.parametrize("command", ["generate", "routes"])
def test_prompts_and_tokens_are_printed_escaped(moe_dir, capsys, command):
    code = main([command, "--model", str(moe_dir), "--prompt", HOSTILE, "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert not raw_controls(out + err), repr(out)
    if command == "generate":  # the prompt is echoed; routes shows it as tokens
        assert "Hi\\x1b[2J\\x1b]0;pwned\\x07 there\\u202e" in out


def test_error_line_names_a_hostile_file_escaped(tmp_path, capsys):
    code = main(["experts", "--risk-diff", str(tmp_path / f"{TITLE}missing.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not raw_controls(err) and "\\x1b]0;pwned\\x07missing.parquet" in err



@pytest.mark.parametrize("error, code, line", [
    (PermissionError(13, "Permission denied", "models/gate/residual.json"), 2,
     "steerline experts: error: Permission denied: models/gate/residual.json"),
    (IsADirectoryError(21, "Is a directory", "experts.json"), 2,
     "steerline experts: error: Is a directory: experts.json"),
    (BrokenPipeError(32, "Broken pipe"), 0, ""),  # `steerline experts | head`
])
def test_os_errors_are_one_line_and_a_closed_pipe_is_not_an_error(monkeypatch, capsys, error,
                                                                   code, line):
    def fail(_args):
        raise error
    monkeypatch.setattr(COMMANDS["experts"], "run", fail)
    assert main(["experts"]) == code
    assert capsys.readouterr().err.strip() == line
