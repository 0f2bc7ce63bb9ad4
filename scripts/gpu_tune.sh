#!/usr/bin/env bash
# make gpu-tune: on a CUDA machine, one call: build for the present GPU, install the
# peers' wheels carried in peers/ (scripts/fetch_peers.sh; no network needed), then
# bench/gpu_tune.py under one deadline for the whole call, build included.
#
#   bash scripts/gpu_tune.sh                  # deadline 360 s
#   GPU_TUNE_DEADLINE=300 bash scripts/gpu_tune.sh
#   bash scripts/gpu_tune.sh --dry-run        # anywhere: the plan and its predicted seconds
#
# Everything goes to $GPU_TUNE_DIR (default bench/out/gpu-tune): build.log, results.csv
# (appended as each job finishes, so a cut-off run keeps what it measured), env.json,
# stages.json, tune.log. Arguments after the options go to bench/gpu_tune.py.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_TUNE_DIR:-bench/out/gpu-tune}
PY=${PYTHON:-python3}
DEADLINE=${GPU_TUNE_DEADLINE:-360}
START=$(date +%s)
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--dry-run" ]; then
    exec "$PY" bench/gpu_tune.py "$@"
fi

# The extension for the present GPU only, in place (as scripts/gpu_check.sh builds it).
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) RESIDUAL_FUSED_BUILD_CUDA=1 \
    timeout -k 5 240 "$PY" setup.py build_ext --inplace >"$DIR/build.log" 2>&1 ||
    { echo "build failed: $DIR/build.log"; tail -n 20 "$DIR/build.log"; exit 1; }
echo "build: $(( $(date +%s) - START ))s"

# Peers carried as wheels: installed beside the code, never over the installed torch.
if ls peers/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --target peers/site peers/*.whl >"$DIR/peers.log" 2>&1 &&
        export PYTHONPATH="$PYTHONPATH:$PWD/peers/site"
    echo "peers: $(ls peers/*.whl | xargs -n1 basename | tr '\n' ' ')"
fi

left=$(( DEADLINE - ($(date +%s) - START) ))
"$PY" bench/gpu_tune.py --out "$DIR" --deadline "$left" "$@" 2>&1 | tee "$DIR/tune.log"
