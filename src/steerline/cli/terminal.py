"""What the `steerline` command prints reaches a terminal: prompts, answers, tokens and file
names are user or model text, and a control character in them is a command to the terminal
(ESC [2J clears the screen, OSC sets the window title or a hyperlink, bidi overrides reorder
what is read). Every character that is not printable text is shown escaped instead.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

# C0 controls but newline and tab, DEL, C1 controls; the Unicode bidi embeddings, overrides and
# isolates ("Trojan Source"); the line and paragraph separators some terminals break lines on.
_CONTROLS = [c for c in range(0x20) if chr(c) not in "\n\t"] + list(range(0x7F, 0xA0))
_FORMATS = [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029]
ESCAPES = {c: f"\\x{c:02x}" for c in _CONTROLS} | {c: f"\\u{c:04x}" for c in _FORMATS}


def escape_controls(text: str) -> str:
    """`text` with every terminal control character written as its Python escape."""
    return text.translate(ESCAPES)


class EscapingWriter:
    """A text stream that escapes control characters before they reach `stream`."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(escape_controls(text))

    def __getattr__(self, name: str):  # flush, isatty, encoding, fileno...: the stream's own
        return getattr(self._stream, name)


@contextlib.contextmanager
def escaped_stdout() -> Iterator[None]:
    """stdout escapes control characters inside the block (restored after). Not stderr: the
    progress bars there move the cursor with a carriage return on purpose; the CLI escapes its
    error line itself."""
    saved = sys.stdout
    sys.stdout = EscapingWriter(saved)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = saved
