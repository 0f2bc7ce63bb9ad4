"""The compiled CPU kernels (csrc/cpu): built where expected, used by the ops, and
right on the paths the rest of the suite does not reach.

Every other CPU test (numerical grids, gradcheck, opcheck, modules, compile,
distributed) runs on these kernels whenever they are built; the tests here cover
what those grids cannot see: fp64 in mixes, the streaming stores of large calls,
thread-count determinism, and the portable (non-AVX2) variant.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import residual_fused as rf
from oracle import Case, check_against_reference

needs_kernels = pytest.mark.skipif(not rf.cpu_kernels_available(),
                                   reason="the CPU kernels are not built (residual_fused._C)")
fwd_op = torch.ops.residual_fused.add_norm_fwd
bwd_op = torch.ops.residual_fused.add_norm_bwd


def test_cpu_kernels_are_loaded_where_the_build_promised_them():
    # scripts/test.sh sets this wherever a C++ compiler is present, so a broken build
    # fails here instead of every other test quietly running the reference.
    if os.environ.get("RESIDUAL_FUSED_EXPECT_CPU_KERNELS") != "1":
        pytest.skip("RESIDUAL_FUSED_EXPECT_CPU_KERNELS is not set")
    assert rf.cpu_kernels_available(), (
        "the CPU kernels are not registered; rebuild with pip install --no-build-isolation -e .")


@needs_kernels
def test_cpu_kernel_is_the_one_dispatched():
    dump = torch._C._dispatch_dump("residual_fused::add_norm_bwd")
    cpu = [line for line in dump.splitlines() if line.startswith("CPU:")]
    assert cpu and "add_norm_cpu.cpp" in cpu[0], dump


# fp64 compute (x is fp64) reading and writing every other dtype. A mix with fp64
# tensors beside a lower-precision x computes in fp32 (the support matrix), so the
# rule's fp64 tolerance does not apply to it.
FP64_MIXES = [
    Case(rms=rms, shape=(9, 77), x=torch.float64, residual=res, weight=w,
         bias=None if rms else w, prenorm=True, residual_dtype=rdt)
    for rms in (False, True)
    for res, w, rdt in [
        (torch.bfloat16, torch.float32, None),
        (torch.float64, torch.float16, torch.float32),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float64, torch.float64),
    ]
]


@pytest.mark.parametrize("case", FP64_MIXES, ids=str)
def test_float64_in_any_mix(case):
    check_against_reference(case, "cpu")


# Above the 32 MiB a call must move before its outputs are written with non-temporal
# stores (csrc/cpu/add_norm_kernel.h). H = 4100 makes every other row start off a
# 32-byte boundary, where the kernel falls back to plain stores within the call.
STREAMED = [
    Case(rms=rms, shape=(1025, hidden), x=dtype, residual=dtype, weight=dtype,
         bias=None if rms else dtype, prenorm=True)
    for rms, hidden, dtype in [(False, 4096, torch.bfloat16), (True, 4100, torch.float32),
                               (False, 4100, torch.float16)]
]


@needs_kernels
@pytest.mark.parametrize("case", STREAMED, ids=str)
def test_large_calls_with_streaming_stores(case):
    check_against_reference(case, "cpu")


def _backward(threads, rows, hidden, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
    saved = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
    dres = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
    rstd = torch.rand(rows, generator=gen) + 0.5
    w = torch.randn(hidden, generator=gen)
    b = torch.randn(hidden, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return bwd_op(dy, dres, saved, rstd, w, b, False, False, None)
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_backward_is_bitwise_reproducible_for_a_thread_count(threads):
    # 600 rows of 1000: 19 tasks' worth of rows, so every thread gets a share.
    first = _backward(threads, 600, 1000)
    again = _backward(threads, 600, 1000)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@needs_kernels
def test_backward_rows_do_not_depend_on_the_thread_count():
    # dx is per row; only the weight gradients' summation order follows the threads.
    one, three = _backward(1, 600, 1000), _backward(3, 600, 1000)
    assert torch.equal(one[0], three[0])
    torch.testing.assert_close(one[2], three[2], rtol=1e-5, atol=1e-4)


@needs_kernels
def test_forward_is_bitwise_reproducible_across_thread_counts():
    x = torch.randn(300, 2000, dtype=torch.bfloat16)
    r = torch.randn(300, 2000)
    w = torch.randn(2000, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(fwd_op(x, r, w, None, 1e-6, True, True, torch.float32))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@needs_kernels
@pytest.mark.slow
def test_portable_variant_passes_the_grids():
    """The kernels compiled without AVX2 (kernel_default.cpp), which CPUs without AVX2
    run: ATen's ATEN_CPU_CAPABILITY=default makes this process pick them."""
    portable = ("DEFAULT", "NO AVX")  # torch < 2.5 names it "NO AVX"
    if torch.backends.cpu.get_cpu_capability() in portable:
        pytest.skip("this CPU runs the portable variant in every test already")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() in portable, probe.stdout
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         os.path.join(tests, "test_add_norm.py"), os.path.join(tests, "test_cpu_kernels.py"),
         "-k", "cpu and (dtype_mixes or flags or zero_rows or float64 or streaming "
               "or reproducible or 83x769 or 7x5125)"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(tests))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_reference_fallback_says_so_once(monkeypatch):
    from residual_fused import _loader, ops

    monkeypatch.setattr(_loader, "_noticed_devices", set())
    monkeypatch.setattr(_loader, "has_kernel", lambda key: False)
    monkeypatch.setenv("RESIDUAL_FUSED_JIT", "0")  # no build on first use here
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="no compiled CPU kernels are loaded"):
        ops._add_norm_fwd_reference(x, None, None, None, 1e-5, False, False, x.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops._add_norm_fwd_reference(x, None, None, None, 1e-5, False, False, x.dtype)
