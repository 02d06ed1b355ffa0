#!/usr/bin/env bash
# The compiled flag sets of scripts/bench_e2e.py (--compile with --fast-aug, and with --device-decode),
# apart from scripts/gpu_checks.sh because compiling ResNet-50 takes minutes of the GPU's time. Same
# conventions: the machine's facts first, the command under `timeout`, PYTHONUNBUFFERED=1, output and
# JSON (after each set) under $OUT as they are written; exits 2 without a CUDA GPU.
#   bash scripts/gpu_checks_compiled.sh           # OUT=gpu_results BUDGET=540 IMAGES=4096
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-540}
source scripts/gpu_machine.sh
start_log gpu_checks_compiled.log
machine_facts gpu_checks_compiled
timeout --kill-after=10 "$BUDGET" "$PY" scripts/bench_e2e.py --images "${IMAGES:-4096}" \
    --sets fast-compile decode-compile --print-freq 4 --step-steps 10 --step-warmup 5 --set-timeout 240 \
    --json "$OUT/bench_e2e_compiled.json" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
