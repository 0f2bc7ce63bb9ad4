#!/usr/bin/env bash
# One-command validation on a CUDA machine: build, CUDA tests, compute-sanitizer,
# benchmark, ncu. Every log and result goes into one folder ($GPU_CHECK_DIR,
# default bench/out/gpu-check); the last lines printed are a one-screen summary.
#
#   bash scripts/gpu_check.sh                          # every stage
#   bash scripts/gpu_check.sh build tests              # some stages, in the order given
#   GPU_CHECK_DEADLINE=500 bash scripts/gpu_check.sh   # start no stage after 500 s
#
# Exits 0 only if every stage that ran passed.
#
# Stages: build kernel-tests bench tests sanitizer ncu audit summary. Each runs under
# `timeout` (its own limit, capped by what is left before the deadline), so a stage
# that hangs does not cost the others. Needs no network: only what is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_CHECK_DIR:-bench/out/gpu-check}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE:-3000}
STAGES=("$@")
FAILED=()
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build kernel-tests bench tests sanitizer ncu audit summary)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

# run_stage NAME LIMIT_S CMD...: output to $DIR/NAME.log; rc and seconds to stages.txt.
run_stage() {
    local name=$1 limit=$2; shift 2
    local avail; avail=$(left)
    if [ "$avail" -lt 20 ]; then echo "$name: skipped (deadline)" | tee -a "$DIR/stages.txt"; return; fi
    [ "$limit" -gt "$avail" ] && limit=$avail
    local t0; t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout -k 5 "$limit" "$@" >"$DIR/$name.log" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && FAILED+=("$name")
    echo "$name: rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$DIR/stages.txt"
    tail -n 3 "$DIR/$name.log"
}

# The extension for the present GPU only, in place (no pip, no network).
build() {
    local arch
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) RESIDUAL_FUSED_BUILD_CUDA=1 RESIDUAL_FUSED_PTXAS_VERBOSE=1
    "$PY" setup.py build_ext --inplace &&
        "$PY" -c "import residual_fused as rf; assert rf.cuda_kernels_available(); print('kernels loaded')"
}

# Every launch path under each compute-sanitizer tool, one log per tool. No kernel
# filter: initcheck counts memory as written only by kernels it watches, so limiting
# it to ours reports inputs that torch's kernels wrote as uninitialised.
sanitizer() {
    local tool rc=0
    for tool in memcheck racecheck synccheck initcheck; do
        echo "--- $tool"
        local sizes=()  # every size; racecheck (slowest): one per kernel family
        [ "$tool" = racecheck ] && sizes=(64 1536 5120 16384 16392 3001)
        timeout -k 5 90 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
            "$PY" scripts/gpu_sanitize_cases.py ${sizes[@]+"${sizes[@]}"} >"$DIR/sanitizer-$tool.log" 2>&1 || rc=1
        grep -E "sanitizer cases|SUMMARY" "$DIR/sanitizer-$tool.log" || tail -n 5 "$DIR/sanitizer-$tool.log"
    done
    return $rc
}

# The sweep (bf16, eager and ours), then its results page, ready to copy into bench/results.
bench() {
    local args=(--providers eager residual_fused --hidden 1024 4096 8192 12288 16384 32768 65536 131072 262144 --repeats 30)
    "$PY" bench/bench_add_norm.py "${args[@]}" --out "$DIR/bench" &&
        "$PY" bench/bench_add_norm.py --page-from "$DIR/bench" --results-dir "$DIR/results" \
            --command "python bench/bench_add_norm.py ${args[*]} --out DIR  (scripts/gpu_check.sh bench)"
}

export PY DIR
export -f build sanitizer bench
nvidia-smi >"$DIR/nvidia-smi.txt" 2>&1
for stage in "${STAGES[@]}"; do
    case $stage in
        build) run_stage build 240 bash -c build ;;
        kernel-tests) run_stage kernel-tests 150 "$PY" -m pytest tests/test_cuda_kernels.py -q -p no:cacheprovider ;;
        bench) run_stage bench 200 bash -c bench ;;
        tests) run_stage tests 170 "$PY" -m pytest tests -m cuda -q -p no:cacheprovider -n 8 ;;
        sanitizer) run_stage sanitizer 330 bash -c sanitizer ;;
        ncu) run_stage ncu 120 ncu --clock-control none --kernel-name regex:"add_norm|reduce_partials" \
                 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                 --section MemoryWorkloadAnalysis "$PY" scripts/gpu_profile_cases.py ;;
        # The static audit's predictions beside this run's bench numbers (bench/sass_audit.py).
        audit) run_stage audit 180 "$PY" bench/sass_audit.py --measured "$DIR/bench/results.csv" ;;
        summary) ;;
        *) echo "unknown stage: $stage (build kernel-tests bench tests sanitizer ncu audit summary)"; exit 2 ;;
    esac
done
{
    echo "## gpu-check summary ($(date -u +%FT%TZ), $(( $(date +%s) - START ))s)"
    grep -E "NVIDIA|Driver" "$DIR/nvidia-smi.txt" | head -n 2 || true
    cat "$DIR/stages.txt" 2>/dev/null
    for f in kernel-tests tests; do
        [ -f "$DIR/$f.log" ] && echo "$f: $(grep -E '(passed|failed|error)' "$DIR/$f.log" | tail -n 1)"
    done
    [ -f "$DIR/sanitizer.log" ] && grep -E "^---|SUMMARY" "$DIR/sanitizer.log"
    [ -f "$DIR/ncu.log" ] && grep -E "^  void|DRAM Throughput|Duration" "$DIR/ncu.log" | sed -E 's/ +/ /g'
    if [ -f "$DIR/audit.log" ]; then
        echo "% of copy bandwidth, bf16 pre-norm LayerNorm: dir | H | kernel | predicted H100 | H200 | measured"
        grep -E "^\| (fwd|bwd) \|" "$DIR/audit.log" | cut -d'|' -f2,3,4,11,12,13
    fi
    echo "failed stages: ${FAILED[*]:-none}"
} | tee "$DIR/summary.txt"
# Exit status: 0 only if every stage that ran passed.
[ ${#FAILED[@]} -eq 0 ]
