# Sourced by scripts/gpu_checks*.sh, from the repository root. OUT (default gpu_results) receives the
# logs; PYTHON (default python3) is the interpreter; output is unbuffered so that a call cut short
# still brings back what ran.
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# start_log FILE: $LOG is $OUT/FILE, emptied.
start_log() {
    mkdir -p "$OUT"
    LOG="$OUT/$1"
    : > "$LOG"
}

# machine_facts NAME prints the machine's facts (GPU, /dev/shm,
# Python, usable cores, torch/torchvision/CUDA versions) into $LOG and exits the script with status 2
# and one sentence where torch cannot be imported or sees no GPU.
machine_facts() {
    local NAME=$1
    {
        date -u
        if command -v nvidia-smi > /dev/null; then
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        else
            echo "nvidia-smi: not found"
        fi
        df -h /dev/shm | tail -1 | awk '{print "/dev/shm: " $2 " (" $4 " free)"}'
    } 2>&1 | tee -a "$LOG"
    timeout 120 "$PY" scripts/gpu_facts.py 2>&1 | tee -a "$LOG"
    case ${PIPESTATUS[0]} in
        0) ;;
        4) echo "$NAME: no CUDA GPU is visible to torch on this machine (torch.cuda.is_available() is False);" \
                "these checks need one. Nothing was run; the facts above are in $LOG." | tee -a "$LOG"
           exit 2 ;;
        *) echo "$NAME: $PY cannot import torch and torchvision; set PYTHON to the interpreter that has them." \
               | tee -a "$LOG"
           exit 2 ;;
    esac
}
