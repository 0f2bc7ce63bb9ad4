#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(EXTRA_DEPS="matplotlib:matplotlib transformers:transformers" bash scripts/setup_env.sh | tail -n 1)
# The SASS audit reads nvcc's output with cuobjdump; where nvcc is present but the
# toolkit lacks cuobjdump, take NVIDIA's pip wheel (not fatal: those tests skip).
if command -v nvcc >/dev/null &&
   ! "$PY" -c "import sys; sys.path.insert(0, 'bench'); import cubin; sys.exit(cubin.find_tool('cuobjdump') is None)"; then
    "$PY" -m pip install -q nvidia-cuda-cuobjdump >&2 || echo "setup: could not install nvidia-cuda-cuobjdump" >&2
fi
exec "$PY" -m pytest tests "$@"
