#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(EXTRA_DEPS="matplotlib:matplotlib transformers:transformers" bash scripts/setup_env.sh | tail -n 1)
# The SASS audit reads nvcc's output with cuobjdump and nvdisasm; where nvcc is present
# but the toolkit lacks them, take NVIDIA's pip wheels (not fatal: those tests skip).
if command -v nvcc >/dev/null && ! "$PY" -c "import sys; from tools import cubin
sys.exit(not (cubin.find_tool('cuobjdump') and cubin.find_tool('nvdisasm')))"; then
    "$PY" -m pip install -q nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm >&2 ||
        echo "setup: could not install nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm" >&2
fi
# Where a C++ compiler is present the setup built the CPU kernels; a test fails if they
# did not load, rather than the suite quietly testing the reference in their place.
if command -v "${CXX:-c++}" >/dev/null; then
    export RESIDUAL_FUSED_EXPECT_CPU_KERNELS="${RESIDUAL_FUSED_EXPECT_CPU_KERNELS:-1}"
fi
exec "$PY" -m pytest tests "$@"
