"""Every kernel source compiles with nvcc for sm_80 and sm_90 without register spills.

Runs wherever ``nvcc`` is on PATH (no GPU or torch build needed: the kernels include
no torch headers) and skips otherwise. A spill or local-memory stack frame in any
kernel fails the test: every kernel here is on a path some shape takes. The compile
is bench/cubin.py's, shared with the SASS audit and the emulator's launch rules.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import cubin  # noqa: E402

pytestmark = [pytest.mark.slow]


def test_kernels_compile_without_spills(kernel_build):
    kernels = kernel_build.kernels
    for source in cubin.SOURCES:
        archs = {arch for (_, arch), k in kernels.items() if k.source == source}
        assert archs == set(cubin.ARCHS), f"{source}: kernels reported for {sorted(archs)}"
    spilled = {f"{k.source}: {k.name} sm_{k.arch}": (k.stack, k.spill_stores, k.spill_loads)
               for k in kernels.values() if k.stack or k.spill_stores or k.spill_loads}
    assert not spilled, f"kernels with stack/spills (stack, stores, loads): {spilled}"


def test_every_kernel_states_its_launch_bounds(kernel_build):
    if not any(k.max_threads for k in kernel_build.kernels.values()):
        pytest.skip("cuobjdump not found (nvidia-cuda-cuobjdump wheel or CUDA toolkit)")
    missing = [f"{k.name} sm_{k.arch}" for k in kernel_build.kernels.values() if not k.max_threads]
    assert not missing, f"kernels without __launch_bounds__: {missing}"
