"""The numerics contract: the same bytes on any x86-64 CPU with AVX2, at any thread count.

`steerline/__init__` calls `pin()` before numpy, torch, scikit-learn or vLLM load, so every
process that computes an output (a stage under `dvc repro` / `dvc exp run`, the `steerline` CLI,
a bench's reference run, pytest through its `-p steerline` plugin) runs under it. This module
imports nothing numeric: the libraries read these variables when they load.

- ISA. Each library picks its kernels by the CPU it finds (AVX-512 and AMX on recent Intel,
  AVX-512 on AMD Zen 4, AVX2 on Zen 2 / 3), and kernels of different widths add in different
  orders and round exp / log differently, so every float may differ in its last bits, and a
  k-means, a router top-k or a greedy token downstream by more. Each library is held to its
  AVX2 kernels, which every x86-64 CPU since Intel Haswell (2013) and AMD Zen has:
  torch's ATen kernels, MKL (torch's BLAS and LAPACK), oneDNN (torch's and vLLM's), OpenBLAS
  (numpy's and scipy's), numpy's own SIMD loops, Arrow's compute kernels, and vLLM's CPU
  kernels (`pin_vllm_cpu`, called by the vLLM backend before vLLM loads).
- Threads. torch splits a reduction of many elements into one part per thread and adds the
  parts (a sum of 3M floats differs between 1, 2, 4 and 16 threads), scikit-learn's k-means
  adds per-thread partial centers in the order the threads finish, and OpenBLAS splits dot
  products by thread. So the intra-op thread count is part of the numerics: every OpenMP, MKL
  and OpenBLAS pool runs THREADS threads, whatever the machine has or the caller set. MKL's
  strict CNR mode makes its GEMM independent of the thread count as well.
- Opt-out: STEERLINE_NATIVE_NUMERICS=1 leaves every library to its own choice of kernels and
  threads: faster on a CPU with AVX-512 or many cores, with bytes that hold on that machine only.
"""

from __future__ import annotations

import logging
import os
import platform
import sys

OPT_OUT = "STEERLINE_NATIVE_NUMERICS"
# Intra-op threads under the contract. 2 = the reference machine's cores (CI, `make repro`), so
# pinning costs nothing there; a bigger CPU runs no faster under the contract (opt out for
# speed), a 1-core one runs 2 threads on its one core (slower, same bytes).
THREADS = 2
ISA = "AVX2"
ISA_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorized kernels and their Sleef exp / log
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",  # STRICT: GEMM bitwise equal at any thread count
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",  # oneDNN's older name (vLLM's bundled build)
    "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS's AVX2 kernels and blocking
    # numpy 2.x dispatch groups above AVX2 (X86_V3); baseline and AVX2 loops stay
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "ARROW_USER_SIMD_LEVEL": "AVX2",
}
THREAD_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "OPENBLAS_NUM_THREADS": str(THREADS),
    "OMP_DYNAMIC": "FALSE",  # an OpenMP runtime may not hand out fewer threads than asked
    # CUDA: cuBLAS's deterministic workspace (same GPU, same bytes run to run; docs/numerics.md)
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
PINNED_ENV = {**ISA_ENV, **THREAD_ENV}
# Loaded before the variables are set, these libraries keep what they read at load time.
NUMERIC_MODULES = ("numpy", "torch", "sklearn", "scipy", "vllm")

log = logging.getLogger(__name__)


def native() -> bool:
    """True when the user opted out of the contract."""
    return os.environ.get(OPT_OUT, "").strip().lower() not in ("", "0", "false", "no")


def cpu_has_avx2() -> bool:
    """An x86-64 CPU with AVX2 (Linux: its /proc/cpuinfo flags; other systems: x86-64 at all)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return True


def pin() -> None:
    """Set the contract's variables (overriding the caller's): the thread counts always, the
    AVX2 kernels where the CPU has them (elsewhere an AVX2 kernel would not run). Warns when a
    numeric library had already loaded, since it then kept its own choice."""
    if native():
        return
    os.environ.update(PINNED_ENV if cpu_has_avx2() else THREAD_ENV)
    early = [m for m in NUMERIC_MODULES if m in sys.modules]
    if early:
        log.warning("steerline's numerics contract was set after %s loaded: import steerline "
                    "first (or export the variables of steerline.numerics.PINNED_ENV) for bytes "
                    "that hold on any CPU", ", ".join(early))


def check() -> dict[str, str | int]:
    """What torch computes with in this process. Raises when the contract is on but torch did
    not take its ISA (torch loaded before pin()); warns on a CPU without AVX2 (an older x86 or
    an ARM one), where bytes hold only on CPUs of that type. The thread count is not checked:
    code may run a step on another fixed count (MAT-Steer's training steps run on one)."""
    import torch

    got: dict[str, str | int] = {"mode": "native" if native() else "pinned",
                                 "isa": torch.backends.cpu.get_cpu_capability(),
                                 "threads": torch.get_num_threads()}
    if got["mode"] == "native":
        return got
    if str(got["isa"]).startswith("AVX512"):  # above the pin: torch read its ISA before pin()
        raise RuntimeError(
            f"steerline's numerics contract wants torch on {ISA}, it runs {got['isa']}: import "
            f"steerline before torch (or set {OPT_OUT}=1 for native numerics)")
    if got["isa"] != ISA:
        log.warning("this CPU has no %s (torch runs %s kernels): results are reproducible on "
                    "CPUs of this type only", ISA, got["isa"])
    return got


def check_if_loaded() -> None:
    """check() when this process has loaded torch (a stage or command that computes)."""
    if "torch" in sys.modules:
        check()


# torch.cpu's ISA queries that vLLM's CPU platform reads to pick its kernel library and paths.
VLLM_ISA_QUERIES = ("_is_avx512_supported", "_is_avx512_bf16_supported",
                    "_is_avx512_vnni_supported", "_is_amx_tile_supported",
                    "_is_amx_fp16_supported")


def pin_vllm_cpu() -> None:
    """Make vLLM's CPU platform take its AVX2 kernel library (vllm._C_AVX2) and non-AMX paths:
    it chooses them from torch.cpu's hardware queries, not from ATEN_CPU_CAPABILITY. Process-wide
    and idempotent; a no-op when opted out."""
    if native():
        return
    import torch.cpu

    for name in VLLM_ISA_QUERIES:
        if hasattr(torch.cpu, name):
            setattr(torch.cpu, name, _false)


def _false() -> bool:
    return False
