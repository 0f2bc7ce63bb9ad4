"""Every kernel source compiles with nvcc for sm_80 and sm_90 without register spills.

Runs wherever ``nvcc`` is on PATH (no GPU or torch build needed: the kernels include
no torch headers) and skips otherwise. A spill or local-memory stack frame in any
kernel fails the test: every kernel here is on a path some shape takes. The compile
is tools/cubin.py's, shared with the SASS audit and the emulator's launch rules.
"""

import os

import pytest

from tools import cubin

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


# The CUDA runtime calls the launch path may make (csrc/kernels and the glue): none
# synchronises the host with the device or allocates, so a call can be captured in a
# CUDA graph (tests/test_cuda_kernels.py captures and replays forward, backward and the
# in-place form on a GPU). The emulator (tools/emulator/cuda_emulation.h) defines only
# these, so a new runtime call there fails the emulated build too.
CAPTURE_SAFE_CALLS = {
    "cudaGetDevice", "cudaDeviceGetAttribute", "cudaGetDeviceProperties",  # device facts (cached)
    "cudaFuncGetAttributes", "cudaFuncSetAttribute",  # per kernel, once per device
    "cudaOccupancyMaxActiveBlocksPerMultiprocessor", "cudaOccupancyMaxActiveClusters",  # planning
    "cudaLaunchKernel", "cudaLaunchKernelExC",  # the launches, on the caller's stream
    "cudaGetLastError", "cudaGetErrorString",  # error reporting
}


def test_launch_path_makes_no_synchronising_call():
    import glob
    import re

    root = os.path.join(os.path.dirname(__file__), "..", "csrc")
    used = {}
    for path in sorted(glob.glob(os.path.join(root, "kernels", "*")) + glob.glob(os.path.join(root, "cuda", "*"))
                       + glob.glob(os.path.join(root, "stable", "*"))):
        with open(path) as f:
            for name in re.findall(r"\b(cu(?:da)?[A-Z]\w*)\s*\(", f.read()):
                used.setdefault(name, os.path.basename(path))
    unexpected = {name: where for name, where in used.items() if name not in CAPTURE_SAFE_CALLS}
    assert not unexpected, (f"CUDA calls outside the capture-safe list (do they synchronise or allocate? "
                            f"if not, add them with why): {unexpected}")
    assert "cudaLaunchKernel" in used  # the scan sees the launch path
