"""The benches' quick mode (not a bench: make bench runs bench/*.py only).

STEERLINE_BENCH_QUICK=1 (`make bench-quick`, CI) runs each bench at its smallest size, once, so
a broken import, a crash or unequal results show within a minute or two. The result line then
carries "quick": true, and tools.bench_contract checks the contract keys and `equal` but not
the goals: at that size the timings are noise.
"""

import os

ENV = "STEERLINE_BENCH_QUICK"
QUICK: bool = os.environ.get(ENV) == "1"
