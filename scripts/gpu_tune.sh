#!/usr/bin/env bash
# make gpu-tune: on a CUDA machine, one call: build for the present GPU, install the
# peers' wheels carried in peers/ (scripts/fetch_peers.sh; no network needed), then
# bench/gpu_tune.py, all under one deadline (build included) that is a hard limit.
#
#   bash scripts/gpu_tune.sh                  # deadline 360 s
#   GPU_TUNE_DEADLINE=300 bash scripts/gpu_tune.sh
#   bash scripts/gpu_tune.sh --dry-run        # anywhere: the plan and its predicted seconds
#
# Everything goes to $GPU_TUNE_DIR (default $OUT/gpu-tune where $OUT is set, as on a
# lent machine whose $OUT comes back, else bench/out/gpu-tune): build.log, results.csv
# (appended as each job finishes, so a cut-off run keeps what it measured; a rerun into
# the same folder resumes), env.json, stages.json, tune.log, page/. Other arguments go
# to bench/gpu_tune.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
for arg in "$@"; do
    [ "$arg" = "--dry-run" ] && exec "$PY" bench/gpu_tune.py "$@"
done
START=$(date +%s)
DEADLINE=${GPU_TUNE_DEADLINE:-360}
MARGIN=15  # between the run's planned end and the hard limit (bench/gpu_tune.py: MARGIN_S)
DIR=${GPU_TUNE_DIR:-${OUT:+$OUT/gpu-tune}}
DIR=${DIR:-bench/out/gpu-tune}
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

# The extension for the present GPU only, in place (as scripts/gpu_check.sh builds it).
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") ||
    { echo "no CUDA device visible to torch"; exit 1; }
TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) RESIDUAL_FUSED_BUILD_CUDA=1 \
    timeout -k 5 "$(( $(left) < 240 ? $(left) : 240 ))" "$PY" setup.py build_ext --inplace >"$DIR/build.log" 2>&1 ||
    { echo "build failed: $DIR/build.log"; tail -n 20 "$DIR/build.log"; exit 1; }
echo "build: $(( $(date +%s) - START ))s"

# Peers carried as wheels, without dependencies, installed beside the code: the
# machine's torch and triton are used as they are, never replaced.
if ls peers/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install --quiet --no-index --no-deps --upgrade --target peers/site peers/*.whl \
        >"$DIR/peers.log" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$PWD/peers/site"
        echo "peers installed: $(ls peers/*.whl | xargs -n1 basename | tr '\n' ' ')"
    else
        echo "peers not installed (see $DIR/peers.log)"
    fi
fi

END=$(( START + DEADLINE - MARGIN ))
timeout -k 5 "$(( $(left) > 1 ? $(left) : 1 ))" \
    "$PY" bench/gpu_tune.py --out "$DIR" --end-at "$END" "$@" 2>&1 | tee "$DIR/tune.log"
