#!/usr/bin/env bash
# Runs one of the test tools (tests/fuzz_emulated.py, mutants.py, kernel_coverage.py) in
# the test environment, setting it up first as make test does. Args: the script, its args.
# The repository root goes on PYTHONPATH: the tools import its tools/ and bench/ packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(EXTRA_DEPS="matplotlib:matplotlib transformers:transformers" bash scripts/setup_env.sh | tail -n 1)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$@"
