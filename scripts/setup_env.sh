#!/usr/bin/env bash
# Prepare the Python environment for residual_fused and install it (editable).
#
# Uses the active virtualenv if there is one, else ./.venv (created with
# --system-site-packages so an installed torch, e.g. a CUDA build, stays visible).
# torch is installed only when it is missing: an installed torch is never replaced.
# Prints the python to use on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
    PY="$VIRTUAL_ENV/bin/python"
else
    [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv --system-site-packages .venv >&2
    PY="$PWD/.venv/bin/python"
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: torch not found; installing ${TORCH_SPEC:=torch==2.13.0}" >&2
    "$PY" -m pip install -q "$TORCH_SPEC" >&2
fi

# Install only what is missing, so a machine without a network that already has
# these packages (a GPU box) needs none.
need=()
for pair in "setuptools:setuptools>=64" "wheel:wheel" "ninja:ninja" "pybind11:pybind11" \
            "pytest:pytest" ${EXTRA_DEPS:-}; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || need+=("${pair#*:}")
done
# One at a time and not fatal: a machine without a network may lack an optional one
# (e.g. wheel, which recent setuptools no longer needs); what is truly missing fails
# below, with pip's or pytest's own message.
for pkg in ${need[@]+"${need[@]}"}; do
    "$PY" -m pip install -q "$pkg" >&2 || echo "setup: could not install $pkg" >&2
done

# --no-build-isolation: build against the torch above (see README, "Install").
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2
echo "$PY"
