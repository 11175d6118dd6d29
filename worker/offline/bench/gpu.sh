#!/usr/bin/env bash
# Issue 14's GPU check in one short run (about 5 minutes on one GPU). Needs a CUDA build of
# torch and `pip install -e '.[local,bench]'`; run from the repository root. Writes
# gpu-local.json and gpu-e2e.json (or under $OUT when set, as on a lent device machine).
#
#  1. worker/offline/bench/gpu_local.py: the local backend's texts/s against the same
#     model's raw batched forward passes (starter and a BERT-base-sized model, fp16),
#     and the ratio (target >= 0.80).
#  2. modworker bench with MODWORKER_BACKEND=local on CUDA: the worker's end-to-end msg/s
#     through the embedded broker (the loopback API server the bench starts goes unused).
set -euo pipefail
out="${OUT:-.}"
py="${PYTHON:-python}"
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 240 "$py" worker/offline/bench/gpu_local.py --seconds 8 --json "$out/gpu-local.json"
timeout 240 "$py" -m worker.cli bench --events 20000 --latencies-ms 0 --batch-sizes 64,256 \
  --concurrency 2 --sweep-concurrency '' --no-latency --no-plot --no-progress \
  --worker-env MODWORKER_BACKEND=local --worker-env MODWORKER_LOCAL__DEVICE=cuda \
  --json "$out/gpu-e2e.json"
