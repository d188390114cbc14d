#!/usr/bin/env bash
# One-shot GPU suite for an H200 machine (torch 2.11, triton 3.6, Python 3.12, pytest, pytest-benchmark, numpy,
# nvidia-ml-py; no open_clip, nothing is installed). Finishes within 8 minutes: every step has a time budget
# taken from one global deadline, and a failing or timed-out step is logged and the suite goes on.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR
#
# Writes at most 9 files into OUT_DIR:
#   suite.log            what ran, each step's exit status and duration
#   env.json             provenance: GPU, driver, clocks, power, torch / triton versions, git SHA, nvidia-smi
#   gpu_tests.log        pytest -m gpu on tests/kernels (compiled kernels against the reference, CUDA-graph replay)
#   perf_measured.json   the performance model calibrated: each kernel's measured time beside its prediction
#                        (benchmarks/perf_model.py --measure; the same table is printed into suite.log)
#   bench.json           merged pytest-benchmark JSON of every benchmark step
#   bench.md, bench.png  the report (benchmarks/report.py): tables, target checks, plot
#   train_throughput.json  the training-throughput hook (see TRAIN HOOK below)
set -u
OUT="${1:?usage: gpu_suite.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

TOTAL_BUDGET="${IGSP_SUITE_BUDGET_S:-450}"  # 7.5 min of steps + SIGKILL grace + the 20 s report: under 8 min
START=$(date +%s)
LOG="$OUT/suite.log"
: > "$LOG"
export PY OUT WORK ROOT
log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# budget WANTED RESERVE: seconds for the next step: at most WANTED, leaving RESERVE (what the later steps want).
budget() {
    local left=$(( TOTAL_BUDGET - ($(date +%s) - START) - $2 ))
    (( left > $1 )) && left=$1
    echo $(( left > 0 ? left : 0 ))
}

# step NAME SECONDS FUNCTION [ARGS...]: run an exported function under a timeout that signals its whole process
# group with SIGINT first (pytest then still writes its JSON), then SIGKILL 10 s later; log the outcome.
step() {
    local name="$1" secs="$2"; shift 2
    if (( secs < 5 )); then log "SKIP $name: no time left in the ${TOTAL_BUDGET}s budget"; return 0; fi
    log "START $name (budget ${secs}s)"
    local t0 rc
    t0=$(date +%s)
    timeout -s INT -k 10 "$secs" bash -c '"$@"' _ "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if (( rc == 0 )); then log "OK    $name ($(( $(date +%s) - t0 ))s)"
    elif (( rc == 124 || rc == 130 || rc == 137 )); then log "TIMEOUT $name after ${secs}s (rc $rc)"
    else log "FAIL  $name (rc $rc, $(( $(date +%s) - t0 ))s)"; fi
    return 0
}

# ---------------------------------------------------------------------------------------------- 1. provenance
env_json() {
    "$PY" - "$OUT/env.json" <<'EOF'
import json, subprocess, sys
sys.path.insert(0, "benchmarks")
from _bench_common import provenance
info = dict(provenance())
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-q", "-d", "CLOCK,POWER,PERFORMANCE"], capture_output=True,
                                        text=True, timeout=20).stdout[-6000:]
except (OSError, subprocess.SubprocessError) as exc:
    info["nvidia_smi"] = f"unavailable: {exc}"
info["python"] = sys.version.split()[0]
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}))
EOF
}
export -f env_json
step "env" "$(budget 15 435)" env_json

# ---------------------------------------------------------------------------------------------- 2. GPU tests
# Six pytest processes side by side: the run is dominated by Triton compiling each kernel specialisation on the
# CPU (~150 variants, single-threaded per process; the GPU work is tiny), and the machine has 16 cores. The
# on-disk Triton cache is shared. Configs are pinned (IGSP_KERNELS_AUTOTUNE=0).
gpu_tests() {
    local K=tests/kernels pids=() rc=0
    run_group() {  # run_group INDEX [pytest args...]
        local i="$1"; shift
        IGSP_KERNELS_AUTOTUNE=0 "$PY" -m pytest -q -m gpu -p no:cacheprovider "$@" > "$WORK/gpu_tests_$i.log" 2>&1
    }
    run_group 0 "$K/test_triton_moe_lora.py" -k "edge_cases" & pids+=($!)
    run_group 1 "$K/test_triton_moe_lora.py" -k "feature_combinations or weight_gradient_paths" & pids+=($!)
    run_group 2 "$K/test_triton_moe_lora.py" -k "not edge_cases and not feature_combinations and not weight_gradient_paths" \
        & pids+=($!)
    run_group 3 "$K/test_triton_routing.py" "$K/test_triton_subspace.py" "$K/test_triton_training.py" \
        "$K/test_cuda_graphs.py" & pids+=($!)
    run_group 4 "$K/test_triton_custom_ops.py" & pids+=($!)
    run_group 5 "$K/test_triton_moe_lora_sample.py" & pids+=($!)
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    cat "$WORK"/gpu_tests_*.log > "$OUT/gpu_tests.log"
    tail -n 3 "$WORK"/gpu_tests_*.log
    return $rc
}
export -f gpu_tests
step "gpu tests" "$(budget 120 315)" gpu_tests

# ---------------------------------------------------------------------------------------------- 2b. perf model
# Measured beside predicted for every kernel of the fused op (headline cases first, then the model's table), with
# the pinned configs the model predicts: the first GPU run calibrates benchmarks/perf_model.py.
perf_measure() {
    "$PY" benchmarks/perf_model.py --measure "$OUT/perf_measured.json" --budget "$1"
}
export -f perf_measure
PERF_SECS="$(budget 75 240)"
step "perf model" "$PERF_SECS" perf_measure "$(( PERF_SECS > 20 ? PERF_SECS - 15 : 5 ))"

# ---------------------------------------------------------------------------------------------- 3. benchmarks
bench() {  # bench NAME FILE [env assignments...]
    local name="$1" file="$2"; shift 2
    env "$@" "$PY" -m pytest -q -p no:cacheprovider "benchmarks/$file" --benchmark-json="$WORK/bench_$name.json" \
        --benchmark-columns=median,iqr,rounds > "$WORK/bench_$name.log" 2>&1
    local rc=$?
    tail -n 5 "$WORK/bench_$name.log"
    return $rc
}
export -f bench
# (a) the headline target case, every provider and mode (torch.compile and autotuning warm up inside it)
step "bench headline" "$(budget 90 150)" bench headline bench_moe_lora.py IGSP_BENCH_CASES=headline
# (b) the curated cases around it, fwd+bwd, without torch.compile (its per-shape compile does not fit the slot)
step "bench cases" "$(budget 35 115)" bench cases bench_moe_lora.py IGSP_BENCH_CASES=default \
    IGSP_BENCH_MODES=fwd+bwd IGSP_BENCH_PROVIDERS=base,eager,smart-dense,fused
# (c) the subspace ops over 24 layers, then the top-k gating kernel
step "bench subspace" "$(budget 20 95)" bench subspace bench_subspace.py
step "bench routing" "$(budget 15 80)" bench routing bench_routing.py

# ---------------------------------------------------------------------------------------------- 4. TRAIN HOOK
# ViT-B/16 phase-1 steps with the Triton kernels and with the reference backend (benchmarks/train_throughput.py).
# It needs open_clip, which that machine lacks: carry its wheels (benchmarks/README.md) and put them on
# PYTHONPATH; without it the step records why it did not run. IGSP_TRAIN_CMD overrides the command.
TRAIN_OUT="$OUT/train_throughput.json"
TRAIN_CMD="${IGSP_TRAIN_CMD:-\$PY benchmarks/train_throughput.py --steps 10 --warmup 3 --out \"\$TRAIN_OUT\"}"
export TRAIN_CMD TRAIN_OUT
train_hook() {
    if ! "$PY" -c "import open_clip" 2>/dev/null; then
        echo '{"status": "not run: open_clip is not importable (carry its wheels, see benchmarks/README.md)"}' > "$TRAIN_OUT"
        return 0
    fi
    eval "$TRAIN_CMD"
}
export -f train_hook
step "train throughput" "$(budget 65 15)" train_hook

# ---------------------------------------------------------------------------------------------- 5. report
report() {
    shopt -s nullglob
    local inputs=("$WORK"/bench_*.json)
    if (( ${#inputs[@]} == 0 )); then echo "no benchmark JSON was written"; return 1; fi
    "$PY" benchmarks/report.py "${inputs[@]}" --md "$OUT/bench.md" --png "$OUT/bench.png" --merge-out "$OUT/bench.json"
    sed -n '/## Targets/,/^## moe_lora/p' "$OUT/bench.md"
}
export -f report
step "report" 15 report
log "done in $(( $(date +%s) - START ))s; files: $(ls "$OUT" | tr '\n' ' ')"
