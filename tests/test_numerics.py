"""The numerics contract (steerline.numerics): the same bytes whatever the caller's thread count
and ISA settings, checked on the numeric cores of build_models, capture and train_steering in
fresh processes (tests/numerics_cores.py); the opt-out gives the libraries their own choice."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steerline import numerics

ROOT = Path(__file__).resolve().parents[1]
CORES = ROOT / "tests" / "numerics_cores.py"
AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_avx2 = pytest.mark.skipif(not AVX2, reason="the contract's guarantee is for x86-64 with AVX2")
# What a caller may have set: all overridden by the contract.
CALLERS = {
    "one thread, native ISA": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                               "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO"},
    "three threads, AVX-512": {"OMP_NUM_THREADS": "3", "ATEN_CPU_CAPABILITY": "avx512",
                               "MKL_ENABLE_INSTRUCTIONS": "AVX512", "OPENBLAS_CORETYPE": "SkylakeX",
                               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}


def run_cores(env: dict[str, str], *cores: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in numerics.PINNED_ENV and k != numerics.OPT_OUT}
    out = subprocess.run([sys.executable, str(CORES), *cores], env={**base, **env}, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_avx2
def test_this_process_runs_the_contract() -> None:
    assert numerics.check() == {"mode": "pinned", "isa": "AVX2", "threads": numerics.THREADS}


@needs_avx2
@pytest.mark.slow
def test_cores_give_the_same_bytes_whatever_the_caller_set() -> None:
    ref = run_cores({})
    for name, env in CALLERS.items():
        assert run_cores(env) == ref, name


def test_opt_out_lets_the_thread_count_change_bytes() -> None:
    """The control: without the contract, torch's sum of 3M floats differs between 1 and 2
    threads (so the test above would see a thread-dependent core)."""
    native = {numerics.OPT_OUT: "1"}
    one = run_cores({**native, "OMP_NUM_THREADS": "1"}, "reduction")
    two = run_cores({**native, "OMP_NUM_THREADS": "2"}, "reduction")
    assert one != two
    assert run_cores({"OMP_NUM_THREADS": "1"}, "reduction") == two  # the contract's 2 threads


def entry_scripts() -> list[Path]:
    """Files run as `python FILE` (stages, benches, scripts, tools)."""
    files = [*ROOT.glob("stages/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*.py"),
             *ROOT.glob("tools/*.py"), CORES]
    return sorted(f for f in files if "__main__" in f.read_text())


NUMERIC = {"numpy", "torch", "pandas", "sklearn", "scipy", "vllm", "transformers", "pyarrow",
           "safetensors", "matplotlib", "dvclive", "baselines"}


@pytest.mark.parametrize("path", entry_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_entry_scripts_load_steerline_before_numeric_libraries(path: Path) -> None:
    """The contract's variables must be set before numpy / torch load: every script run as
    `python FILE` imports steerline first (package modules always come after its __init__)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            tops = {n.split(".")[0] for n in names}
            if tops & NUMERIC:
                pytest.fail(f"{path.name}: line {node.lineno} imports {sorted(tops & NUMERIC)} "
                            "before steerline")
            if "steerline" in tops:
                return
