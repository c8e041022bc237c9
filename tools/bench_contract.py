"""The bench contract: every bench/*.py prints one JSON object as its last stdout line,

    {"bench": name, "ratio": number, "equal": bool, "goal": "ratio >= 3", "baseline": name, ...}

`equal` says the compared methods gave the same results; `goal` is "ratio >= X" (a speedup) or
"ratio <= X" (an overhead). A bench with a second goal reports it as a boolean key named
`meets_<what>_goal` (e.g. meets_rss_goal); false fails like a missed ratio goal. `"quick": true`
marks a run at the bench's smallest size (STEERLINE_BENCH_QUICK=1, bench/quick): its timings are
noise, so its goals are not checked, only the contract and `equal`.
`python -m tools.bench_contract [--quick] OUT...` reads saved bench outputs (stdout), prints one
line per bench and exits 1 when any output breaks the contract, misses a goal or is not equal
(`make bench` runs it after the benches); with --quick (`make bench-quick`) every output must be
a quick run, without it none may be.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GOAL = re.compile(r"^ratio\s*(>=|<=)\s*([0-9]+(?:\.[0-9]+)?)$")
SECOND_GOAL = re.compile(r"^meets_[a-z0-9_]+_goal$")
REQUIRED = {"bench": str, "ratio": (int, float), "equal": bool, "goal": str, "baseline": str}


def parse_last_line(text: str, source: str = "bench output") -> dict[str, Any]:
    """The JSON object on the last non-empty line of `text`; ValueError naming what is wrong."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{source}: no output; the bench must print its JSON line last")
    try:
        obj = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise ValueError(f"{source}: the last line is not JSON ({lines[-1][:80]!r}); print the "
                         "result object last") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: the last line must be a JSON object")
    for key, kind in REQUIRED.items():
        if key not in obj:
            raise ValueError(f"{source}: the result has no {key!r} key")
        if not isinstance(obj[key], kind) or (key == "ratio" and isinstance(obj[key], bool)):
            raise ValueError(f"{source}: {key!r} has the wrong type ({obj[key]!r})")
    if not isinstance(obj.get("quick", False), bool):
        raise ValueError(f"{source}: 'quick' has the wrong type ({obj['quick']!r})")
    if not GOAL.match(obj["goal"]):
        raise ValueError(f"{source}: goal {obj['goal']!r} must read 'ratio >= X' or 'ratio <= X'")
    return obj


def meets_goal(result: dict[str, Any]) -> bool:
    """True when result["ratio"] satisfies result["goal"] (a NaN ratio never does)."""
    m = GOAL.match(result["goal"])
    if m is None:
        raise ValueError(f"goal {result['goal']!r} must read 'ratio >= X' or 'ratio <= X'")
    ratio, bound = float(result["ratio"]), float(m[2])
    if math.isnan(ratio):
        return False
    return ratio >= bound if m[1] == ">=" else ratio <= bound


def check(texts: dict[str, str], quick: bool = False) -> tuple[list[str], bool]:
    """One summary line per output (name -> stdout text) and whether all passed; `quick`: the
    outputs are quick runs, whose goals are not checked."""
    lines, ok = [], True
    for name, text in texts.items():
        try:
            res = parse_last_line(text, name)
        except ValueError as err:
            lines.append(f"FAIL {err}")
            ok = False
            continue
        if res.get("quick", False) is not quick:
            lines.append(f"FAIL {name}: a {'quick' if res.get('quick') else 'full'} run, "
                         f"checked as a {'quick' if quick else 'full'} one (STEERLINE_BENCH_QUICK "
                         "and tools.bench_contract's --quick must agree)")
            ok = False
            continue
        extra = {k: v for k, v in res.items() if SECOND_GOAL.match(k)}
        bad_extra = sorted(k for k, v in extra.items() if v is not True)
        good = res["equal"] and (quick or (meets_goal(res) and not bad_extra))
        ok &= good
        goal = f"goal {res['goal']}" + (", not checked: quick" if quick else "")
        lines.append(f"{'PASS' if good else 'FAIL'} {res['bench']}: ratio {res['ratio']} vs "
                     f"{res['baseline']} ({goal}), equal {str(res['equal']).lower()}"
                     + "".join(f", {k} {str(v).lower()}" for k, v in sorted(extra.items())))
    return lines, ok


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in args
    paths = [a for a in args if a != "--quick"]
    if not paths:
        sys.exit("usage: python -m tools.bench_contract [--quick] BENCH_STDOUT_FILE...")
    lines, ok = check({p: Path(p).read_text() for p in paths}, quick)
    print("\n".join(lines))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
