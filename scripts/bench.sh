#!/usr/bin/env bash
# Set up (if needed) and run the main benchmark. Extra args go to the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(EXTRA_DEPS="matplotlib:matplotlib" bash scripts/setup_env.sh | tail -n 1)
exec "$PY" bench/bench_add_norm.py "$@"
