#!/usr/bin/env bash
# Download the peers' wheels that bench/gpu_tune.py compares with into peers/ (ignored
# by git), on a machine with a package index, to carry them to a GPU machine without
# network. Only pure-Python wheels, without dependencies: the GPU machine's torch and
# triton are used as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p peers
# Pinned: the version the provider code was written against (bench/providers.py).
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest peers "liger-kernel==0.8.5"
ls -l peers/*.whl
