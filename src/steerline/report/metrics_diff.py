"""`dvc metrics diff` against a base commit, and which commit that is."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def dvc_executable() -> str:
    """The dvc beside this Python when it is not on PATH (a venv not activated)."""
    return shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))


def metrics_diff(base: str, root: Path) -> str:
    """`dvc metrics diff BASE --md`, or why it is not available."""
    dvc = dvc_executable()
    try:
        res = subprocess.run([dvc, "metrics", "diff", base, "--md"], cwd=root,
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"n/a: `dvc metrics diff` could not run ({err})\n"
    if res.returncode != 0:
        msg = (res.stderr.strip().splitlines() or ["failed"])[-1]
        return f"n/a: `dvc metrics diff {base} --md` failed: {msg}\n"
    table = [ln for ln in res.stdout.strip().splitlines() if ln.strip()]
    if len(table) <= 2:  # only the header: nothing differs
        return f"No metric changed vs {base}.\n"
    return "\n".join(table) + "\n"


def base_ref(root: Path, wanted: str | None) -> str:
    """The base of the diff: `wanted`, else the branch main when it exists, else HEAD."""
    if wanted:
        return wanted
    ok = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "main"], cwd=root,
                        capture_output=True).returncode == 0
    return "main" if ok else "HEAD"
