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
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]} (missing from $("$PY" -c 'import sys; print(sys.prefix)'))" >&2
fi
for pkg in ${need[@]+"${need[@]}"}; do
    "$PY" -m pip install -q "$pkg" >&2 || echo "setup: could not install $pkg" >&2
done

# The editable install picks up Python changes by itself; it is redone only when what
# the extension is built from changed (sources, build files, torch, build settings),
# or when this checkout's package does not import from this folder.
stamp_file="$("$PY" -c 'import sys; print(sys.prefix)')/residual_fused-build.stamp"
stamp=$( { "$PY" -c "import torch, sys; print(torch.__version__, sys.version)";
           env | grep -E '^(RESIDUAL_FUSED_BUILD_|CXX=|CUDA_HOME=|CUDA_PATH=|TORCH_CUDA_ARCH_LIST=)' | sort;
           cat setup.py pyproject.toml residual_fused/_build_env.py;
           find csrc -type f | LC_ALL=C sort | xargs cat; } | sha256sum | cut -c1-16)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] &&
   "$PY" -c "import residual_fused._loader as o, sys, os
sys.exit(not (o.__file__.startswith(os.getcwd() + os.sep) and o.load_error is None))" 2>/dev/null; then
    echo "setup: residual_fused is installed and its build is up to date; not reinstalling" >&2
else
    # --no-build-isolation: build against the torch above (see docs/install.md).
    echo "setup: installing residual_fused (editable, compiling its extension)" >&2
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2
    echo "$stamp" > "$stamp_file"
fi
echo "$PY"
