"""Named kill points for the crash tests (tests/test_faults.py).

`kill_point(name)` does nothing unless the environment variable STEERLINE_KILL_AT equals `name`;
then the process sends itself SIGKILL on the spot (no cleanup, no finally blocks), as a machine
losing power or an OOM kill would. The stages call it at the moments where a kill is most
likely to leave something half-done.
"""

from __future__ import annotations

import os
import signal

KILL_ENV = "STEERLINE_KILL_AT"


def kill_point(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
