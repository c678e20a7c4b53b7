#!/usr/bin/env bash
# The GPU-host measurements of BENCHMARKS.md in one go (an NVIDIA/AMD host with a Vulkan driver): the adapter, a
# smoke run on the GPU backend, the engine table (benches/peers/gpu_host.py), the CPU batch table at every core
# (benches/peers/cpu_batch.py) and `edgepack serve --device gpu`
# under load against FastAPI + onnxruntime (benches/peers/serve_load.py). Tables go into BENCHMARKS.md; logs into
# the folder given (default: a temp folder).
#
#   EDGEPACK_BIN=target/release/edgepack [WRK=wrk] benches/gpu_host.sh [LOG_DIR]
#
# Needs: the edgepack binary (gpu feature, the default), wrk, python3 with numpy, onnx, onnxruntime, fastapi and
# uvicorn (and, for the PyTorch eager rows, torch with CUDA and onnx2torch). DURATION (s per load cell, default 5),
# RUNS (timed runs per engine cell, default 30), BATCHES (default 1,8,32,128), MAX_BATCH (default 32) and
# WRK_THREADS (default 4) tune it.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-$(mktemp -d)}
mkdir -p "$LOG"
BIN=${EDGEPACK_BIN:?set EDGEPACK_BIN to the edgepack binary}
DURATION=${DURATION:-5}
RUNS=${RUNS:-30}
MAX_BATCH=${MAX_BATCH:-32}
WRK_THREADS=${WRK_THREADS:-4}
step() { printf '\n==> %s\n' "$*"; }

step "host"
nvidia-smi -L 2>&1 | tee "$LOG/host.txt" || true
nproc | tee -a "$LOG/host.txt"
step "edgepack devices"
timeout 120 "$BIN" devices --json 2>&1 | tee "$LOG/devices.json"
if ! grep -q '"api"' "$LOG/devices.json"; then
  echo "FATAL: no GPU adapter (see $LOG/devices.json)" >&2
  exit 1
fi
step "smoke: the shipped model on the GPU backend"
timeout 180 "$BIN" run assets/models/efficientnet_lite0_fp32.onnx assets/photos/skimage_chelsea.png --preset tf \
  --device gpu --json > "$LOG/smoke.json" 2> "$LOG/smoke.err" || { cat "$LOG/smoke.err" >&2; exit 1; }
head -c 600 "$LOG/smoke.json"; echo
step "engine: GPU vs CPU backends vs onnxruntime"
# PyTorch eager rows when torch with CUDA and onnx2torch import (the wheel travels: see benches/peers/torch_eager.py).
TORCH=""
python3 -c 'import torch, onnx2torch; assert torch.cuda.is_available()' 2>/dev/null && TORCH="--torch"
timeout 420 python3 benches/peers/gpu_host.py --batches "${BATCHES:-1,8,32,128}" --runs "$RUNS" --f16 $TORCH \
  --md BENCHMARKS.md 2>&1 | tee "$LOG/engine.log"
engine=$?
step "CPU backend at batch 1/8/32 on every core vs onnxruntime, with and without the block cache"
timeout 300 python3 benches/peers/cpu_batch.py --runs "$RUNS" --rounds 2 --md BENCHMARKS.md 2>&1 | tee "$LOG/cpu_batch.log"
step "fused programs vs the step-by-step path, with device counters"
timeout 300 python3 benches/gpu_fused.py --runs "$RUNS" --slow-runs 5 2>&1 | tee "$LOG/fused.log"
step "serve: edgepack serve --device gpu vs FastAPI + onnxruntime"
timeout 330 python3 benches/peers/serve_load.py --device gpu --binary --max-batch "$MAX_BATCH" \
  --wrk-threads "$WRK_THREADS" --duration "$DURATION" --md BENCHMARKS.md 2>&1 | tee "$LOG/serve.log"
serve=$?
cp BENCHMARKS.md "$LOG/BENCHMARKS.md"
echo "engine exit $engine, serve exit $serve; logs in $LOG"
[ "$engine" = 0 ] && [ "$serve" = 0 ]
