#!/usr/bin/env bash
# The GPU checks in one command (one call of a lent GPU machine, at most 10 minutes; planned for 8 on
# one H100/H200 with 16 cores):
#   1. the machine's facts (GPU, usable cores, torch/torchvision/CUDA versions, /dev/shm);
#   2. the nvJPEG race test (tests/test_fastaug_device_decode.py, pytorch/vision issue 9606);
#   3. the host-synchronisation tests (main_moco's loop under torch.cuda.set_sync_debug_mode("error")
#      for the plain, --fast-aug and --device-decode paths, and each part of them);
#   4. the other CUDA tests, file by file;
#   5. a shortened scripts/bench_e2e.py: a few thousand generated JPEGs, ResNet-50 at 224 px, batch 256,
#      K 65536, the reference configuration, --amp --channels-last --fast-aug, and --device-decode
#      (the compiled sets: scripts/gpu_checks_compiled.sh).
# Every step runs under its own `timeout`, cut to what is left of BUDGET seconds; all output goes to
# $OUT/gpu_checks.log as it is written, step results to $OUT/steps.tsv, pytest reports to
# $OUT/*.xml and the benchmark's JSON to $OUT/bench_e2e.json after each flag set, so that a call cut
# short still brings back everything that ran. Installs nothing and needs no network.
#   bash scripts/gpu_checks.sh                    # OUT=gpu_results BUDGET=470 IMAGES=4096
# Without a CUDA GPU it prints the machine's facts, says so and exits with status 2.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-470}
IMAGES=${IMAGES:-4096}
source scripts/gpu_machine.sh
start_log gpu_checks.log
printf 'step\tstatus\tseconds\n' > "$OUT/steps.tsv"

say() { echo "$*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: COMMAND under `timeout`, limited to what is left of the budget.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        say "== $name: skipped, ${left} s left of the ${BUDGET} s budget"
        printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "== $name (timeout ${limit} s, at ${SECONDS} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local status=$rc
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="timeout"
    say "== $name: exit $status after $((SECONDS - start)) s"
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$OUT/steps.tsv"
}

say "== machine"
machine_facts gpu_checks

# pytest-timeout, where installed, limits each test too; `timeout` limits each invocation regardless
PER_TEST=()
"$PY" -c "import pytest_timeout" > /dev/null 2>&1 && PER_TEST=(--timeout=200)
PYTEST=("$PY" -m pytest -q -rA -p no:cacheprovider "${PER_TEST[@]}")
UNITS=(tests/test_fastaug_batch_augment.py tests/test_builder.py tests/test_prefetch.py tests/test_fastaug_device_decode.py)
SYNC="host_wait or never_wait_for_the_gpu"
RACE="overwritten_by_work_queued"

step "decoder race" 120 "${PYTEST[@]}" -s -m cuda -k "$RACE" --junitxml "$OUT/race.xml" tests/test_fastaug_device_decode.py
step "host syncs" 300 "${PYTEST[@]}" -m cuda -k "$SYNC" --junitxml "$OUT/sync.xml" "${UNITS[@]}" tests/test_cuda.py
for file in "${UNITS[@]}"; do
    name=$(basename "$file" .py)
    step "cuda $name" 90 "${PYTEST[@]}" -m cuda -k "not ($SYNC) and not $RACE" --junitxml "$OUT/$name.xml" "$file"
done
step "bench_e2e" 300 "$PY" scripts/bench_e2e.py --images "$IMAGES" --sets default fast decode \
    --print-freq 4 --step-steps 10 --step-warmup 3 --set-timeout 150 --json "$OUT/bench_e2e.json"
# last: the scripts end to end and --compile, the slowest tests
step "cuda test_cuda" 240 "${PYTEST[@]}" -m cuda -k "not ($SYNC)" --junitxml "$OUT/test_cuda.xml" tests/test_cuda.py

say "== summary (also in $OUT/steps.tsv; benchmark rows in $OUT/bench_e2e.json)"
tee -a "$LOG" < "$OUT/steps.tsv"
awk -F'\t' 'NR > 1 && $2 != "0" { failed = 1 } END { exit failed }' "$OUT/steps.tsv"
