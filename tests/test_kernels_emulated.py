"""The CUDA kernels, run on the CPU by tools/emulator, against the reference ops.

No GPU is needed: the kernel sources and their launch plans are compiled by the host
compiler with an emulation of threads, barriers, warp shuffles and shared memory
(tools/cuda_emulator.py). Every launch path runs under five thread orders with
bitwise-identical outputs required (tests/emulated_cases.py), in guarded memory
with poisoned outputs and shared memory, under the launch rules of an H100, an A100
and a 99 KB sm_86 part with the kernels' real registers and shared memory. This
checks indexing, coverage, synchronisation and launch configuration; speed and
hardware behaviour need a GPU. tests/test_emulator_mutations.py checks that planted
bugs fail these tests.
"""

import ctypes
import os
import subprocess
import sys

import pytest
import torch

import emulated_cases as cases
import repo_root
from emulated_cases import FLAGS, PATHS
from tools import cuda_emulator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu(request):
    lib = os.environ.get("RESIDUAL_FUSED_EMULATOR_LIB")
    if not lib:
        try:
            lib = cuda_emulator.build_cached()
        except FileNotFoundError as why:
            pytest.skip(str(why))
    try:
        kernels = request.getfixturevalue("kernel_build")
    except pytest.skip.Exception:
        kernels = None  # no nvcc: the launch rules use no resource table
    e = cuda_emulator.Emulator(lib, kernels)
    yield e
    e.configure()


@pytest.fixture
def with_resources(emu):
    if not emu.resources_loaded:
        pytest.skip("needs nvcc for the kernels' resource table")
    return emu


@pytest.mark.parametrize("path", PATHS, ids=[cases.path_id(p) for p in PATHS])
def test_every_path_under_every_schedule(emu, path):
    cases.check_path(emu, path)


def test_fallback_and_persistent_ctas(emu):
    cases.check_fallback_and_persistence(emu)


def test_wide_rows_take_the_cluster_kernels(with_resources):
    cases.check_cluster_plans(with_resources)


WIDE_CASES = [(h, name, "contiguous") for h, name in cases.WIDE_GRID] + [
    (24576, "ln_mixed_pre", "offset"), (65536, "rms_bf16_mem", "offset")]


@pytest.mark.parametrize("hidden,name,layout", WIDE_CASES, ids=[f"H{h}-{n}-{l}" for h, n, l in WIDE_CASES])
def test_wide_rows(emu, hidden, name, layout):
    cases.check_wide(emu, hidden, name, layout)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("profile", cuda_emulator.PROFILES)
def test_every_hidden_size_is_launchable(with_resources, profile, aligned):
    cases.sweep(with_resources, profile, aligned)


def test_every_hidden_size_is_launchable_in_float64(with_resources):
    cases.sweep(with_resources, "sm86", True, dtype=torch.float64, hi=70000)


@pytest.mark.parametrize("hidden,flags", [(128, "ln_bf16_pre"), (1000, "ln_mixed_pre"),
                                          (1536, "ln_bf16_f32w"), (41, "rms_bf16_mem")])
def test_rows_are_batch_invariant(emu, hidden, flags):
    emu.configure("h100", sm_count=4)  # few SMs: the batch of 4096 loops over persistent CTAs
    try:
        cases.check_batch_invariance(emu, hidden, FLAGS[flags])
    finally:
        emu.configure()


def test_weight_gradients_are_bitwise_deterministic(emu):
    first = cases.check(emu, 10, 1000, FLAGS["ln_mixed_pre"], seed=1)
    second = cases.check(emu, 10, 1000, FLAGS["ln_mixed_pre"], seed=1)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_emulator_knows_every_static_shared_array(with_resources, kernel_build):
    """Each kernel's __shared__ arrays, found by symbol in the emulator library, add up
    to the static shared memory nvcc reports: every array gets a per-CTA copy."""
    for k in kernel_build.kernels.values():
        if k.arch != "90":
            continue
        host = sum(size for _, size in with_resources.static_shared.get(k.name, []))
        assert host == k.static_smem, f"{k.name}: {host} bytes found, nvcc reports {k.static_smem}"


# ---- the launch plan is computed once, failures are clean -------------------------------

def test_failed_queries_while_planning_still_launch_what_was_sized(with_resources):
    cases.check_failed_queries(with_resources)


def test_a_workspace_that_does_not_match_the_plan_is_refused(emu):
    cases.check_workspace_mismatch_is_refused(emu)


def test_a_failed_launch_leaves_no_error_pending(emu):
    cases.check_failed_launch_is_cleared(emu)


def test_each_tensor_misaligned_alone_or_in_a_dtype_of_its_own(emu):
    cases.check_each_tensor_alone(emu)


# ---- the emulator's own checks ------------------------------------------------------------

def test_a_read_past_the_end_is_reported_with_the_allocation(emu):
    """A forward told the tensor has one more row than it does reads past x's end."""
    hidden, rows = 256, 4
    x = cuda_emulator.Guarded(emu.lib, "x", rows * hidden * 2, 0, False)
    y = cuda_emulator.Guarded(emu.lib, "y", (rows + 1) * hidden * 2, 0, False)
    rstd = cuda_emulator.Guarded(emu.lib, "rstd", (rows + 1) * 4, 0, False)
    try:
        bf16 = cuda_emulator.DTYPE_CODE[torch.bfloat16]
        f32 = cuda_emulator.DTYPE_CODE[torch.float32]
        params = emu.fwd_params.fill(
            {"rows": rows + 1, "hidden": hidden, "is_rms_norm": True, "eps": 1e-5, "weight_offset": 0.0},
            {"x": (x.ptr, hidden, bf16), "residual": None, "weight": None, "bias": None,
             "y": (y.ptr, hidden, bf16), "residual_out": None, "rstd": (rstd.ptr, 0, f32), "mean": None})
        status = emu.lib.emu_fwd(ctypes.byref(params), ctypes.sizeof(params))
        message = emu.lib.emu_message().decode()
    finally:
        for g in (x, y, rstd):
            g.free()
    assert status != 0
    assert "past the end of x" in message and "add_norm_fwd_rows_kernel" in message, message


# ---- the params structs, as the driver builds them --------------------------------------

def test_the_driver_lays_out_the_params_as_the_library_does(emu):
    """tools/cuda_emulator.py builds its ctypes structures from the field table the
    library exports (csrc/kernels/params.h); both structs come out at the library's
    size, with each tensor's row stride and dtype where params.h gives them."""
    fwd, bwd = emu.fwd_params, emu.bwd_params
    assert set(fwd.tensors) == {"x", "residual", "weight", "bias", "y", "residual_out", "rstd", "mean"}
    assert set(bwd.tensors) == {"dy", "dresidual_out", "saved", "rstd", "mean", "weight", "bias", "dx", "dresidual",
                                "dweight", "dbias", "dweight_partial", "dbias_partial"}
    assert fwd.row_strided == {"x", "residual"} and bwd.row_strided == {"dy", "dresidual_out", "saved"}
    assert fwd.typed == {"x", "residual", "weight", "bias", "residual_out"}
    assert bwd.typed == {"dy", "dresidual_out", "saved", "weight", "bias", "dresidual"}
    assert set(fwd.scalars) == {"rows", "hidden", "is_rms_norm", "eps", "weight_offset"}
    for layout in (fwd, bwd):
        assert ctypes.sizeof(layout.struct) == layout.size


def test_a_call_must_name_every_field_and_only_those(emu):
    """A field added to a params list stops every driver call that does not give it;
    a name the struct lacks is refused too, not dropped."""
    scalars = {"rows": 1, "hidden": 8, "is_rms_norm": True, "eps": 1e-5, "weight_offset": 0.0}
    tensors = {n: None for n in emu.fwd_params.tensors}
    emu.fwd_params.fill(scalars, tensors)
    for broken_scalars, broken_tensors, word in (
            ({k: v for k, v in scalars.items() if k != "eps"}, tensors, "'eps'"),
            (scalars, {k: v for k, v in tensors.items() if k != "mean"}, "'mean'"),
            (dict(scalars, extra=1), tensors, "'extra'"),
            (scalars, dict(tensors, residual2=None), "'residual2'")):
        with pytest.raises(cuda_emulator.EmulatorError, match=word):
            emu.fwd_params.fill(broken_scalars, broken_tensors)
    with pytest.raises(cuda_emulator.EmulatorError, match="'residual2'"):
        emu.plan_fwd(4, 8, {"x": cuda_emulator.TensorSpec(torch.float32), "residual2": None}, True)


def test_a_struct_of_another_size_is_refused(emu):
    """A driver built against another layout of the struct is refused, not read."""
    scalars = {"rows": 0, "hidden": 8, "is_rms_norm": True, "eps": 1e-5, "weight_offset": 0.0}
    params = emu.fwd_params.fill(scalars, {n: None for n in emu.fwd_params.tensors})
    status = emu.lib.emu_fwd(ctypes.byref(params), ctypes.sizeof(params) - 8)
    assert status != 0
    assert "the params struct passed has" in emu.lib.emu_message().decode()
    params = emu.bwd_params.fill({"rows": 0, "hidden": 8, "is_rms_norm": True, "memory_efficient": False,
                                  "weight_offset": 0.0, "partial_rows": 0},
                                 {n: None for n in emu.bwd_params.tensors})
    assert emu.lib.emu_bwd(ctypes.byref(params), ctypes.sizeof(params) + 8, 0) != 0
    assert "the params struct passed has" in emu.lib.emu_message().decode()


@pytest.mark.parametrize("value, want", [
    ("fwd=streamed;bwd=rows:pt=32", "streamed rows:pt=32,tb=512,red=columns,st=1"),
    ("rows:pt=24", "RESIDUAL_FUSED_VARIANT='rows:pt=24': pt (elements per thread) must be 16 or 32"),
])
def test_the_variant_variable_is_read_at_the_first_call(emu, value, want):
    """RESIDUAL_FUSED_VARIANT itself (emulated_cases.check_variant_environment applies
    values through the same function in-process): a process started with it runs what
    it says, or refuses every call saying why."""
    script = ("import emulated_cases as c\n"
              "from bench import variants\n"
              "from tools import cuda_emulator\n"
              f"emu = cuda_emulator.Emulator({emu.path!r})\n"
              "try:\n"
              "    c.check(emu, 3, 1024, c.FLAGS['ln_bf16_pre'])\n"
              "    e = variants.Entry(emu.lib)\n"
              "    print(e.last('fwd'), e.last('bwd'))\n"
              "except cuda_emulator.EmulatorError as err:\n"
              "    print(err)\n")
    here = os.path.dirname(os.path.abspath(__file__))
    env = repo_root.env(here, base=dict(os.environ, RESIDUAL_FUSED_VARIANT=value))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert want in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_the_ring_matches_the_kernels_without_it(emu):
    """st=2 (the next rows copied into shared memory while this one computes), forward
    and backward, against the reference and bitwise against st=1, over every row
    layout and flag set."""
    cases.check_ring(emu)
