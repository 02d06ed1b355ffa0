#!/usr/bin/env bash
# The GPU checks in one call of the device tool (or on any CUDA machine): the CUDA tests, then the
# end-to-end benchmark of scripts/bench_e2e.py. Results go under $OUT (default ./gpu_results).
#   bash scripts/gpu_checks.sh                       # everything (about 10 minutes on an H100)
#   SETS="default fast decode-compile" IMAGES=11264 bash scripts/gpu_checks.sh   # a shorter benchmark
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
nproc | tee -a "$OUT/device.txt"
$PY -m pytest -m cuda -q -p no:cacheprovider -rs 2>&1 | tail -40 | tee "$OUT/pytest_cuda.txt"
$PY scripts/bench_e2e.py --images "${IMAGES:-22528}" --sets ${SETS:-default amp fast fast-compile decode decode-compile} \
    --json "$OUT/bench_e2e.json" 2>&1 | tail -25 | tee "$OUT/bench_e2e.txt"
