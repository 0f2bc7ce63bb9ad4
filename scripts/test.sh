#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(EXTRA_DEPS="matplotlib:matplotlib transformers:transformers" bash scripts/setup_env.sh | tail -n 1)
exec "$PY" -m pytest tests "$@"
