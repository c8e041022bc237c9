"""The bench contract (tools.bench_contract): the checker, and every bench/*.py declares it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench_contract import check, main, meets_goal, parse_last_line

BENCH = Path(__file__).resolve().parents[1] / "bench"


def line(**kw) -> str:
    obj = {"bench": "x", "ratio": 3.5, "equal": True, "goal": "ratio >= 3",
           "baseline": "seed_style_loop"}
    obj.update(kw)
    return "some log\n" + json.dumps(obj) + "\n\n"


def test_parse_takes_the_last_json_line():
    assert parse_last_line(line(ratio=4.0))["ratio"] == 4.0


@pytest.mark.parametrize(("text", "needle"), [
    ("", "no output"),
    ("ratio 3\n", "not JSON"),
    ("[1, 2]\n", "JSON object"),
    (json.dumps({"bench": "x", "ratio": 1.0, "equal": True, "goal": "ratio >= 1"}), "'baseline'"),
    (line(ratio="3"), "'ratio' has the wrong type"),
    (line(ratio=True), "'ratio' has the wrong type"),
    (line(goal="fast"), "must read 'ratio >= X'"),
    (line(quick="yes"), "'quick' has the wrong type"),
])
def test_parse_rejects_broken_output(text, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        parse_last_line(text, "bench/x.py")


@pytest.mark.parametrize(("ratio", "goal", "ok"), [
    (3.0, "ratio >= 3", True), (2.99, "ratio >= 3", False),
    (1.10, "ratio <= 1.10", True), (1.2, "ratio <= 1.10", False),
    (float("nan"), "ratio >= 3", False),
])
def test_meets_goal(ratio, goal, ok):
    assert meets_goal({"ratio": ratio, "goal": goal}) is ok


def test_check_fails_on_a_missed_goal_or_unequal_results():
    lines, ok = check({"a": line(), "b": line(ratio=2.0)})
    assert not ok and lines[0].startswith("PASS x") and lines[1].startswith("FAIL x")
    assert check({"a": line(equal=False)})[1] is False
    assert check({"a": line()}) == (
        ["PASS x: ratio 3.5 vs seed_style_loop (goal ratio >= 3), equal true"], True)


def test_check_fails_on_a_missed_second_goal():
    lines, ok = check({"a": line(meets_rss_goal=False, peak_rss_gb=2.05)})
    assert not ok and lines == ["FAIL x: ratio 3.5 vs seed_style_loop (goal ratio >= 3), equal "
                                "true, meets_rss_goal false"]
    assert check({"a": line(meets_rss_goal=True)})[1] is True
    assert check({"a": line(meets_rss_goal="yes")})[1] is False  # only a JSON true passes


def test_quick_runs_check_equal_but_not_the_goals():
    lines, ok = check({"a": line(ratio=0.5, quick=True, meets_rss_goal=False)}, quick=True)
    assert ok and lines == ["PASS x: ratio 0.5 vs seed_style_loop (goal ratio >= 3, not checked: "
                            "quick), equal true, meets_rss_goal false"]
    assert check({"a": line(quick=True, equal=False)}, quick=True)[1] is False


@pytest.mark.parametrize(("result", "quick"), [({"quick": True}, False), ({"quick": False}, True),
                                               ({}, True)])
def test_a_quick_run_is_never_checked_as_a_full_one_nor_the_reverse(result, quick):
    lines, ok = check({"out/a.out": line(**result)}, quick=quick)
    assert not ok and "STEERLINE_BENCH_QUICK and tools.bench_contract's --quick" in lines[0]


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_every_bench_prints_the_contract_keys(path):
    src = path.read_text()
    assert "json.dumps" in src
    for key in ("bench", "ratio", "equal", "goal", "baseline", "quick"):
        assert f'"{key}":' in src, f"{path.name} never writes {key!r}"
    assert re.search(r'"goal": "ratio (>=|<=) [0-9.]+"', src), path.name
    assert "from quick import QUICK" in src, f"{path.name} has no quick mode (bench/quick)"


def test_a_quick_bench_run_meets_the_contract(tmp_path, capsys):
    """`make bench-quick` as CI runs it, for the one bench that needs no pipeline output:
    bench/risk_diff.py at its smallest size (a few seconds), checked with --quick."""
    out = tmp_path / "risk_diff.out"
    done = subprocess.run([sys.executable, str(BENCH / "risk_diff.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "STEERLINE_BENCH_QUICK": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    out.write_text(done.stdout)
    main(["--quick", str(out)])  # exits 1 on a broken contract or unequal results
    assert capsys.readouterr().out.startswith("PASS risk_diff: ")
    assert json.loads(done.stdout.splitlines()[-1])["quick"] is True
    with pytest.raises(SystemExit):
        main([str(out)])  # a quick run does not pass as a full one



# One process loads the numeric libraries the benches import (torch, transformers, vLLM: most of
# a bench's import time), then forks one child per bench, which runs that bench's module body as
# `python bench/x.py` would: bench/ first on sys.path (PYTHONPATH), not the project root, and of
# the project only the steerline package itself (the numerics contract) loaded before it. A child
# sends its traceback and exits 1 on an error; the parent prints {bench file: [exit code,
# traceback tail]} as its last line.
PROBE = """
import steerline, importlib, json, os, runpy, sys, traceback
for lib in ("numpy", "pandas", "pyarrow.parquet", "torch", "transformers", "vllm"):
    try:
        importlib.import_module(lib)
    except ImportError:  # not installed: the bench that needs it fails in its own child
        pass
results = {}
for path in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            runpy.run_path(path, run_name="bench_probe")
            code = 0
        except SystemExit as e:  # as the interpreter ends on it
            code = e.code if isinstance(e.code, int) else (e.code is not None)
        except BaseException:
            os.write(w, traceback.format_exc()[-2000:].encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    results[os.path.basename(path)] = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bench_imports(tmp_path_factory) -> dict[str, list]:
    paths = [str(p) for p in sorted(BENCH.glob("*.py"))]
    done = subprocess.run([sys.executable, "-c", PROBE, *paths],
                          cwd=tmp_path_factory.mktemp("probe"), capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(BENCH)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_every_bench_imports_as_make_bench_runs_it(path, bench_imports):
    """`python bench/x.py` puts bench/ first on sys.path, not the project root: a bench that
    imports the dev `tools` package or a function that moved fails there. Its module body runs
    (imports, constants), its main does not."""
    code, err = bench_imports[path.name]
    assert code == 0, err
