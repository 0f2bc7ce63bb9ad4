"""The emulated kernels' cases, shared by tests/test_kernels_emulated.py and the
mutation test (which runs them on a library built from mutated kernel sources):

    python tests/emulated_cases.py --lib path/to/residual_fused_emulated.so

Every launch path is run against the reference ops under every schedule, with
bitwise-identical outputs required across schedules; then the small-shared-memory
fallback, persistent CTAs looping over rows, and the launch-only sweep of hidden
sizes on every GPU profile. Exits 1 at the first failure, saying what failed.
"""

import argparse
import ctypes
import dataclasses
import os
import random
import re
import sys
from typing import Optional

import repo_root

repo_root.rerun_with_root(__name__)

import torch  # noqa: E402

import numerics  # noqa: E402
from residual_fused import reference  # noqa: E402
from tools import cuda_emulator  # noqa: E402

SCHEDULES = tuple(cuda_emulator.SCHEDULES)
MAX_SWEEP_HIDDEN = 262144


def ops():
    import residual_fused  # noqa: F401  (registers the reference ops)

    return torch.ops.residual_fused


@dataclasses.dataclass(frozen=True)
class Flags:
    name: str
    rms: bool
    x: torch.dtype
    residual: object  # dtype or None
    weight: object
    bias: object
    store: bool  # write residual_out (pre-norm, or saved for backward)
    memory_efficient: bool
    dres_out: bool  # pre-norm: residual_out has its own upstream gradient


FLAGS = {
    # pre-norm LayerNorm, bf16 activations with an fp32 residual stream and fp32 params
    "ln_mixed_pre": Flags("ln_mixed_pre", False, torch.bfloat16, torch.float32, torch.float32,
                          torch.float32, True, False, True),
    # pre-norm LayerNorm, all bf16 (a compiled fast path)
    "ln_bf16_pre": Flags("ln_bf16_pre", False, torch.bfloat16, torch.bfloat16, torch.bfloat16,
                         torch.bfloat16, True, False, True),
    # pre-norm RMSNorm, fp16 activations with an fp32 residual stream and fp32 weight
    "rms_fp16_mixed": Flags("rms_fp16_mixed", True, torch.float16, torch.float32, torch.float32,
                            None, True, False, True),
    # bf16 activations and residual with fp32 parameters: no fast path, the generic kernel
    "ln_bf16_f32w": Flags("ln_bf16_f32w", False, torch.bfloat16, torch.bfloat16, torch.float32,
                          torch.float32, True, False, True),
    # RMSNorm, all bf16, memory-efficient (saves y)
    "rms_bf16_mem": Flags("rms_bf16_mem", True, torch.bfloat16, torch.bfloat16, torch.bfloat16,
                          None, True, True, False),
    # LayerNorm of x alone in fp16, bias only, saves x
    "ln_fp16_plain": Flags("ln_fp16_plain", False, torch.float16, None, None, torch.float16,
                           False, False, False),
    "ln_fp64": Flags("ln_fp64", False, torch.float64, torch.float64, torch.float64,
                     torch.float64, True, False, True),
    "rms_fp32": Flags("rms_fp32", True, torch.float32, torch.float32, torch.float32, None,
                      True, False, True),
    # float64 x with lower-precision residual and parameters, memory-efficient
    "ln_fp64_mixed": Flags("ln_fp64_mixed", False, torch.float64, torch.float32, torch.float16,
                           torch.bfloat16, True, True, False),
    # fp32 outputs (y, dx) in every path, where a 16-bit rounding cannot hide a wrong
    # formula: all fp32 (a compiled fast path), and fp32 x with 16-bit others (generic)
    "ln_fp32_pre": Flags("ln_fp32_pre", False, torch.float32, torch.float32, torch.float32,
                         torch.float32, True, False, True),
    "ln_f32_any": Flags("ln_f32_any", False, torch.float32, torch.bfloat16, torch.float16,
                        torch.float32, True, False, True),
    "rms_f32_any_mem": Flags("rms_f32_any_mem", True, torch.float32, torch.float16, torch.bfloat16,
                             None, True, True, False),
}

# (hidden, rows, flag sets, layout): one or more per launch path of csrc/kernels, each
# path with at least one flag set of fp32 outputs (x in fp32).
# Rows kernels: a row per row_threads_for(hidden, elements per thread) threads, several
# rows per CTA when that is less than the block; each dtype mix with a fast path, and
# the generic kernel (ln_bf16_f32w, every misaligned or odd case).
PATHS = [
    # 16-byte vectors (hidden % 8 == 0, aligned), 16 elements per thread
    (8, 37, ["ln_mixed_pre", "rms_bf16_mem", "ln_fp16_plain", "ln_fp32_pre"], "contiguous"),  # 1 thread per row
    (128, 10, ["ln_bf16_pre", "rms_bf16_mem", "ln_bf16_f32w", "ln_f32_any"], "contiguous"),  # 8 threads per row
    (512, 10, ["ln_mixed_pre", "ln_fp16_plain", "rms_fp16_mixed", "rms_f32_any_mem"], "strided"),  # a warp per row
    (1000, 10, ["ln_mixed_pre", "rms_bf16_mem", "ln_fp16_plain", "ln_bf16_f32w", "ln_fp32_pre"], "contiguous"),
    (1536, 11, ["ln_bf16_pre", "rms_fp32", "ln_f32_any"], "contiguous"),  # 3 warps per row, several rows per CTA
    (5120, 4, ["ln_mixed_pre", "rms_bf16_mem", "rms_fp16_mixed", "ln_fp32_pre"], "contiguous"),  # 10 warps per row
    # thread-block clusters (sm_90): 2 CTAs; 3 of 352 threads with a short last slice;
    # 8; 16 CTAs of 32 elements per thread (the generic mix's backward streams there)
    (12288, 3, ["ln_bf16_pre", "rms_fp16_mixed", "ln_bf16_f32w", "ln_f32_any"], "strided"),
    (16392, 3, ["rms_fp16_mixed", "ln_mixed_pre", "rms_bf16_mem", "ln_fp32_pre"], "contiguous"),
    (65536, 2, ["ln_bf16_pre", "rms_bf16_mem", "rms_f32_any_mem"], "contiguous", "h100", 8),
    (262144, 2, ["ln_mixed_pre", "rms_fp16_mixed", "ln_bf16_f32w", "ln_fp32_pre"], "contiguous", "h100", 16),
    # without clusters (A100): 32 elements per thread in a CTA; fwd staged and bwd
    # streamed (vec8); fwd streamed (vec8)
    (8200, 3, ["ln_mixed_pre", "rms_bf16_mem", "ln_bf16_f32w", "ln_f32_any"], "strided", "a100"),
    (16384, 3, ["ln_bf16_pre", "rms_bf16_mem", "ln_fp32_pre"], "contiguous", "a100"),  # 512 threads per row
    (16392, 3, ["ln_mixed_pre", "rms_f32_any_mem"], "contiguous", "a100"),
    (49160, 2, ["rms_bf16_mem", "ln_fp32_pre"], "contiguous", "a100"),
    # element-wise (odd sizes, misaligned rows): generic kernel, 4 elements per thread
    (1, 10, ["ln_mixed_pre", "rms_bf16_mem", "ln_f32_any"], "contiguous"),
    (41, 37, ["ln_mixed_pre", "rms_bf16_mem", "ln_fp16_plain", "rms_f32_any_mem"], "contiguous"),
    (257, 10, ["ln_mixed_pre", "ln_fp16_plain", "ln_fp32_pre"], "contiguous"),
    (1024, 10, ["ln_mixed_pre", "rms_bf16_mem", "ln_f32_any"], "offset"),
    (3001, 4, ["ln_mixed_pre", "rms_bf16_mem", "rms_f32_any_mem"], "contiguous"),
    (5125, 3, ["ln_mixed_pre", "rms_bf16_mem", "ln_fp32_pre"], "contiguous"),  # streamed, element-wise
    # float64 (gradcheck's path) and fp32
    (6, 5, ["ln_fp64"], "contiguous"),
    (769, 4, ["ln_fp64_mixed", "ln_fp64", "rms_fp32"], "contiguous"),
]


def path_id(path) -> str:
    profile = f"-{path[4]}" if len(path) > 4 else ""
    return f"H{path[0]}-{path[3]}{profile}"


def _tensor(rows, hidden, dtype, gen, layout, mean=0.0, scale=1.0):
    """[rows, hidden] with layout 'contiguous', 'strided' (wider rows) or 'offset'
    (storage starts one element in: not 16-byte aligned). `scale` is applied before the
    rounding to dtype, so the layout is the tensor the kernels get."""
    if dtype is None:
        return None
    pad = {"contiguous": 0, "strided": 8, "offset": 0}[layout]
    extra = 1 if layout == "offset" else 0
    base = torch.randn(rows * (hidden + pad) + extra, generator=gen, dtype=torch.float64) * scale + mean
    return base.to(dtype)[extra:].view(rows, hidden + pad)[:, :hidden]


def _vector(hidden, dtype, gen, away_from_zero=False):
    if dtype is None:
        return None
    v = torch.randn(hidden, generator=gen, dtype=torch.float64)
    if away_from_zero:
        v = torch.sign(v) * (0.5 + v.abs().clamp(max=1.0))
    return v.to(dtype)


def check(emu, rows, hidden, flags: Flags, layout="contiguous", seed=0, directions=("fwd", "bwd"),
          with_mean: Optional[bool] = None):
    """Forward and backward (or those of ``directions``) of one case against the float64
    reference, within the bounds of tests/numerics.py; returns every output the kernels
    wrote, by name. The backward's inputs come from the reference, not the forward.
    LayerNorm's backward from the sum gets the forward's row mean as autograd passes it,
    or none (the kernels then reduce the row once more for it): ``with_mean``, by
    default with the mean where rows + hidden is even, so every grid covers both."""
    gen = torch.Generator().manual_seed(seed)
    f = flags
    # Rows with a mean far from zero, as residual streams have: a term that wrongly
    # includes (0 - mean)^2 for a chunk past the row end then shows in rstd.
    x = _tensor(rows, hidden, f.x, gen, layout, mean=3.0)
    residual = _tensor(rows, hidden, f.residual, gen, layout)
    weight = _vector(hidden, f.weight, gen, away_from_zero=f.memory_efficient)
    bias = _vector(hidden, f.bias, gen)
    out_dtype = f.residual or f.x
    # fp32 activations with eps = 0.1: eps then moves rstd by about 5%, far beyond the
    # fp32 bound, so an eps dropped, subtracted or added twice cannot hide (with 1e-5
    # it is within the rounding of a wide row's variance).
    eps = 0.1 if f.x == torch.float32 else 1e-5
    args = (x, residual, weight, bias, eps, f.rms, f.store, out_dtype)
    outputs = {}
    if "fwd" in directions:
        y, res, rstd, mean = emu.fwd(*args, store_mean=not f.rms)
        got = {"y": y, "residual_out": res, "rstd": rstd, "mean": mean}
        numerics.check_forward(got, x, residual, weight, bias, eps, f.rms, f.store, store_mean=not f.rms)
        outputs.update({k: v for k, v in got.items() if v is not None})
    if "bwd" not in directions:
        return outputs

    # The backward's inputs: what the forward saved, as the float64 reference has it.
    (y64, s64, rstd64), _ = numerics.forward_reference(x, residual, weight, bias, eps, f.rms)
    saved = (y64.to(f.x) if f.memory_efficient else (s64.to(out_dtype) if f.store else x))
    rstd_in = rstd64.to(torch.float64 if f.x == torch.float64 else torch.float32)
    if with_mean is None:
        with_mean = (rows + hidden) % 2 == 0
    mean_in = s64.mean(-1).to(rstd_in.dtype) if with_mean and not f.rms and not f.memory_efficient else None
    dy = _tensor(rows, hidden, f.x, gen, layout, scale=1 / 8)
    dres_out = _tensor(rows, hidden, out_dtype, gen, layout, scale=1 / 8) if f.dres_out else None
    dres_dtype = residual.dtype if residual is not None and residual.dtype != x.dtype else None
    dx, dres, dw, db = emu.bwd(dy, dres_out, saved, rstd_in, weight, bias, f.rms, f.memory_efficient,
                               dres_dtype, mean=mean_in)
    got = {"dx": dx, "dresidual": dres, "dweight": dw, "dbias": db}
    numerics.check_backward(got, dy, dres_out, saved, rstd_in, weight, bias, f.rms, f.memory_efficient)
    outputs.update({k: v for k, v in got.items() if v is not None})
    return outputs


def check_schedules(emu, rows, hidden, flags: Flags, layout="contiguous", seed=0,
                    schedules=SCHEDULES):
    """check() under each schedule (tensors flush against the end of their mapping on
    even schedules, against the start on odd ones); outputs must match bitwise."""
    first, first_name = None, None
    try:
        for k, name in enumerate(schedules):
            emu.schedule(name, seed=seed + 1)
            emu.flush_start = k % 2 == 1
            try:
                got = check(emu, rows, hidden, flags, layout, seed)
            except AssertionError as err:
                raise AssertionError(f"{flags.name} H={hidden} {layout}, schedule {name}: {err}") from None
            if first is None:
                first, first_name = got, name
                continue
            for out, t in got.items():
                if not torch.equal(t, first[out]):
                    diff = (t.double() - first[out].double()).abs().max().item()
                    raise AssertionError(
                        f"{flags.name} H={hidden} {layout}: {out} differs between schedules "
                        f"{first_name} and {name} (max |diff| {diff:.3g}): the result depends on "
                        f"thread order, so a barrier or a shuffle is missing")
    finally:
        emu.schedule("round_robin")
        emu.flush_start = False


def check_path(emu, path, schedules=SCHEDULES):
    """A PATHS entry: (hidden, rows, flags, layout[, profile[, SMs]]), 3 SMs by default
    (persistent CTAs loop); clusters of 8 or 16 CTAs need as many SMs. The first flag
    set runs under every schedule given, the others under the first and last of them
    (the emulator's race checks find a missing barrier under any order)."""
    hidden, rows, names, layout = path[:4]
    emu.configure(*path[4:])
    try:
        for k, name in enumerate(names):
            orders = schedules if k == 0 else tuple(dict.fromkeys((schedules[0], schedules[-1])))
            check_schedules(emu, rows, hidden, FLAGS[name], layout, seed=hidden, schedules=orders)
    finally:
        emu.configure()


def uses_clusters(path) -> bool:
    """Whether a PATHS entry runs the cluster kernels (H100 profile, rows wider than
    16384, 16-byte vectors)."""
    hidden, layout = path[0], path[3]
    return hidden > 16384 and hidden % 8 == 0 and layout != "offset" and (len(path) < 5 or path[4] == "h100")


def check_fallback_and_persistence(emu):
    # 99 KB GPUs (sm_86/89) cannot stage H = 16384's backward in shared memory: the
    # streamed kernels take over.
    emu.configure("sm86")
    check_schedules(emu, 3, 16384, FLAGS["ln_mixed_pre"], schedules=("round_robin", "warp_greedy"))
    # One SM: a persistent CTA loops over every row.
    emu.configure("h100", sm_count=1)
    check_schedules(emu, 23, 2048, FLAGS["rms_bf16_mem"], schedules=("random", "warp_greedy"))
    check_schedules(emu, 9, 4097, FLAGS["ln_mixed_pre"], schedules=("reverse", "warp_greedy"))
    # More partial rows (40 streamed CTAs) than the column reduction takes: the sliced
    # reduction of the weight gradients.
    emu.configure("h100", sm_count=40)
    check_schedules(emu, 40, 5125, FLAGS["ln_mixed_pre"], schedules=("round_robin", "warp_greedy"))
    emu.configure()


def check_code_without_clusters(emu):
    """An H100 running code built for compute_80 or compute_89 (PTX compiled by the JIT,
    e.g. TORCH_CUDA_ARCH_LIST="8.9+PTX"): the cluster kernels' cluster code is compiled
    out there, so wide rows must take the other kernels (the emulator refuses a
    cluster launch of such code)."""
    try:
        for hidden, name, arch in ((16400, "ln_bf16_pre", 89), (40000, "rms_fp16_mixed", 80)):
            emu.configure("h100", sm_count=16, code_arch=arch)
            check(emu, 3, hidden, FLAGS[name])
    finally:
        emu.configure()


# (profile, hidden, forward kernel, backward kernel): the family dispatch.cu's comments
# promise for bf16 rows, 16-byte aligned, 4096 rows. Dispatch choosing a slower but
# correct family passes every numeric check; this pins the choice at a few shapes.
PLAN_FAMILIES = [
    ("h100", 1024, "add_norm_fwd_rows_kernel", "add_norm_bwd_rows_kernel"),
    ("h100", 1001, "add_norm_fwd_rows_kernel", "add_norm_bwd_rows_kernel"),
    ("h100", 16384, "add_norm_fwd_rows_kernel", "add_norm_bwd_rows_kernel"),
    ("h100", 65536, "add_norm_fwd_cluster_kernel", "add_norm_bwd_cluster_kernel"),
    ("a100", 20000, "add_norm_fwd_staged_kernel", "add_norm_bwd_streamed_kernel"),
    ("a100", 65536, "add_norm_fwd_streamed_kernel", "add_norm_bwd_streamed_kernel"),
]


def check_plan_families(emu):
    spec = cuda_emulator.TensorSpec
    bf16 = torch.bfloat16
    fwd = {n: spec(bf16) for n in ("x", "residual", "weight", "bias", "y", "residual_out")}
    fwd["rstd"] = spec(torch.float32)
    bwd = {n: spec(bf16) for n in ("dy", "saved", "weight", "bias", "dx", "dweight", "dbias")}
    bwd["rstd"] = spec(torch.float32)
    try:
        for profile, hidden, fwd_kernel, bwd_kernel in PLAN_FAMILIES:
            emu.configure(profile, sm_count=0)
            got = (emu.plan_fwd(4096, hidden, fwd, False)[0]["kernel"],
                   emu.plan_bwd(4096, hidden, bwd, False, False)[0]["kernel"])
            assert fwd_kernel in got[0] and bwd_kernel in got[1], (profile, hidden, got)
    finally:
        emu.configure()


def check_huge_row_counts(emu):
    """Row counts past 2^30 and 2^31 (planned, not run): every launch stays within the
    grid limit of 2^31 - 1 CTAs (persistent CTAs loop over the rows; the staged forward,
    a CTA per row, caps its grid). On an A100, wide rows take the staged kernels."""
    spec = cuda_emulator.TensorSpec
    for profile, dtype in (("h100", torch.bfloat16), ("a100", torch.bfloat16), ("h100", torch.float64)):
        emu.configure(profile, sm_count=0)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        fwd = {n: spec(dtype) for n in ("x", "residual", "weight", "bias", "y", "residual_out")}
        fwd["rstd"] = spec(acc)
        bwd = {n: spec(dtype) for n in ("dy", "saved", "weight", "bias", "dx", "dweight", "dbias")}
        bwd["rstd"] = spec(acc)
        for rows in (2**30 + 1, 2**31 + 3):
            for hidden in (1, 1024, 4097, 20000, 65536):
                launches = (emu.plan_fwd(rows, hidden, fwd, False) +
                            emu.plan_bwd(rows, hidden, bwd, False, False))
                for launch in launches:
                    assert 1 <= launch["grid"] <= 2**31 - 1, (profile, rows, hidden, dtype, launch)
    emu.configure()


BATCH_SIZES = (1, 7, 83, 4096)


def check_uncached_devices(emu):
    """Device indices 64 and 65, past dispatch.cu's per-device attribute caches (queried
    on every call there), plan and compute like any other."""
    with open(os.path.join(cuda_emulator.KERNELS, "dispatch.cu")) as f:
        table = int(re.search(r"kMaxDevices = (\d+);", f.read()).group(1))
    assert table == cuda_emulator.KMAX_DEVICES, (table, cuda_emulator.KMAX_DEVICES)
    for device in (table, table + 1):
        emu.configure(device=device)
        check(emu, 5, 1000, FLAGS["ln_mixed_pre"])
    emu.configure()


def check_staged_parameter_lengths(emu):
    """Element-wise rows stage weight and bias byte for byte: 16-byte aligned starts with
    lengths that are not a multiple of 16 (H = 51: 102 and 204 bytes) take the narrow
    copies, and every byte arrives."""
    emu.configure()
    for name in ("ln_bf16_pre", "ln_fp32_pre"):
        check(emu, 7, 51, FLAGS[name])


BATCH_SIZES = (1, 7, 83, 4096)


def check_batch_invariance(emu, hidden, flags: Flags, batch_sizes=BATCH_SIZES, seed=0):
    """A row's y, residual_out, dx and dresidual are bitwise the same whether it is
    computed alone or in a batch of any size (serving stacks rely on it): the first
    rows of the largest batch, computed as batches of each smaller size."""
    OPS = ops()
    gen = torch.Generator().manual_seed(seed)
    f = flags
    n = max(batch_sizes)
    x = _tensor(n, hidden, f.x, gen, "contiguous", mean=3.0)
    residual = _tensor(n, hidden, f.residual, gen, "contiguous")
    weight = _vector(hidden, f.weight, gen, away_from_zero=f.memory_efficient)
    bias = _vector(hidden, f.bias, gen)
    out_dtype = f.residual or f.x
    dy = _tensor(n, hidden, f.x, gen, "contiguous") / 8
    dres_out = _tensor(n, hidden, out_dtype, gen, "contiguous") / 8 if f.dres_out else None
    dres_dtype = residual.dtype if residual is not None and residual.dtype != x.dtype else None

    def run(rows):
        def head(t):
            return None if t is None else t[:rows]
        y, res_out, _, mean = emu.fwd(head(x), head(residual), weight, bias, 1e-5, f.rms, f.store,
                                      out_dtype, store_mean=not f.rms)
        # the saved tensor comes from the reference, so only the backward is under test
        ref = OPS.add_norm_fwd(head(x), head(residual), weight, bias, 1e-5, f.rms, f.store, out_dtype, 0.0,
                               not f.rms and not f.memory_efficient)
        saved = ref[0] if f.memory_efficient else (ref[1] if f.store else head(x))
        shift = None if f.rms or f.memory_efficient else ref[3]
        dx, dres, _, _ = emu.bwd(head(dy), head(dres_out), saved, ref[2], weight, bias, f.rms,
                                 f.memory_efficient, dres_dtype, mean=shift)
        out = {"y": y, "dx": dx}
        if mean is not None:
            out["mean"] = mean
        if f.store:
            out["residual_out"] = res_out
        if dres_dtype is not None:
            out["dresidual"] = dres
        return out

    full = run(n)
    for rows in sorted(batch_sizes)[:-1]:
        part = run(rows)
        for name, t in part.items():
            if not torch.equal(t, full[name][:rows]):
                raise AssertionError(f"{f.name} H={hidden}: {name} of the first {rows} rows differs "
                                     f"when computed in a batch of {n}")


def bwd_case(emu, hidden=8192, rows=40, **kw):
    """A memory-efficient backward with fp32 weight and bias (at H = 8192 its plan opts
    in to > 48 KB of shared memory: 64 KB of parameters are staged): (emulated
    outputs, the op's arguments)."""
    gen = torch.Generator().manual_seed(hidden)
    dy = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
    saved = (torch.randn(rows, hidden, generator=gen) + 3).to(torch.bfloat16)
    rstd = torch.rand(rows, generator=gen) + 0.5
    w = _vector(hidden, torch.float32, gen, away_from_zero=True)
    b = torch.randn(hidden, generator=gen)
    args = (dy, None, saved, rstd, w, b, False, True, None)
    return emu.bwd(*args, **kw), args


# Per failed query: a backward where it changes the plan. The opt-in matters for the
# 64 KB of staged parameters at H = 8192; the occupancy and attribute queries for an
# element-wise backward at H = 1001, two 512-thread CTAs per SM (a failed query plans
# one, or the streamed kernel).
# A failed cluster occupancy query (H = 65536 on a 16-SM H100) leaves the wide row to the
# streamed kernels.
FAILED_QUERIES = [("set_attribute", 8192, 4), ("occupancy", 1001, 4), ("func_attributes", 1001, 4),
                  ("occupancy", 65536, 16)]


def check_failed_queries(emu):
    """A failed attribute or occupancy query while planning makes the plan smaller; the
    launch must use that same plan (planning again could see more CTAs than there are
    workspace rows, and write past the workspace), and leave no error pending."""
    for kind, hidden, sms in FAILED_QUERIES:
        emu.configure("h100", sm_count=sms)
        emu.inject(kind, after=0)
        try:
            got, args = bwd_case(emu, hidden=hidden)
            dy, dro, saved, rstd, w, b, rms, mem, _ = args
            numerics.check_backward(dict(zip(("dx", "dresidual", "dweight", "dbias"), got)), dy, dro, saved,
                                    rstd, w, b, rms, mem)
        except AssertionError as err:
            raise AssertionError(f"with one failed {kind} call: {err}") from None
        finally:
            emu.clear_injections()
            emu.configure()


def check_workspace_mismatch_is_refused(emu):
    """A workspace of more or fewer rows than the plan it was sized for is refused before
    any launch (cudaErrorInvalidValue)."""
    for delta in (1, -1):
        try:
            bwd_case(emu, workspace_delta=delta)
        except cuda_emulator.EmulatorError as err:
            if "(cudaError 1)" not in str(err):  # cudaErrorInvalidValue, and not 1xx
                raise
            continue
        raise AssertionError(f"a workspace of {delta:+d} rows against its plan was accepted")


def check_failed_launch_is_cleared(emu):
    """A refused launch returns its error once; nothing is left pending for the next call."""
    emu.configure()
    emu.inject("launch", after=0, error=7)  # cudaErrorLaunchOutOfResources
    try:
        bwd_case(emu)
        raise AssertionError("a launch made to fail reported success")
    except cuda_emulator.EmulatorError as err:
        if "(cudaError 7)" not in str(err):  # the injected error itself, and not 7xx
            raise
    finally:
        emu.clear_injections()
    pending = emu.lib.emu_take_last_error()
    assert pending == 0, f"the refused launch left cudaError {pending} pending"


def sweep(emu, profile, aligned, dtype=torch.bfloat16, rows=4096, hi=MAX_SWEEP_HIDDEN):
    """Every plan for H in 1..hi launchable on `profile`, workspace matching grid."""
    emu.configure(profile, sm_count=0)
    try:
        failures, text = emu.sweep(1, hi, rows, aligned, dtype)
    finally:
        emu.configure()
    assert failures == 0, (f"{failures} hidden sizes fail the launch rules on {profile} "
                           f"({'aligned' if aligned else 'misaligned'} {dtype}):\n{text}")


# ---- wide rows: the grid of hidden sizes the cluster kernels and their fallbacks see ----
# (hidden, flags): every dtype mix appears; H % 8 != 0 takes the element-wise kernels.
WIDE_GRID = [
    (12288, "ln_bf16_pre"), (16384, "rms_fp16_mixed"), (24576, "ln_mixed_pre"),
    (32768, "ln_bf16_f32w"), (49152, "rms_bf16_mem"), (65536, "ln_fp16_plain"),
    (131072, "rms_fp32"), (262144, "ln_bf16_pre"),
    (16385, "ln_mixed_pre"), (40000, "rms_fp16_mixed"), (99999, "ln_bf16_f32w"),
]


def check_wide(emu, hidden, name, layout):
    """One wide case on an H100 with one full GPC (clusters of up to 16 fit), against
    the reference under two schedules."""
    emu.configure("h100", sm_count=16)
    try:
        check_schedules(emu, 2, hidden, FLAGS[name], layout, seed=hidden,
                        schedules=("random", "warp_greedy"))
    finally:
        emu.configure()


# hidden -> CTAs per cluster on an H100 with one 16-SM GPC, forward and backward (bf16)
CLUSTER_PLANS = {16384: 1, 16392: 3, 65536: 8, 131072: 8, 262144: 16}


def check_cluster_plans(emu):
    """Wide rows take the cluster kernels where clusters exist (and fit), with the
    documented shape; never on a GPU without them."""
    try:
        emu.configure("h100", sm_count=16)
        for hidden, cluster in CLUSTER_PLANS.items():
            for backward in (False, True):
                plan = emu.plan(backward, hidden, 64)
                assert plan is not None, f"H={hidden}: refused"
                assert plan["cluster"] == cluster and ("cluster_kernel" in plan["kernel"]) == (cluster > 1), (
                    f"H={hidden} {'bwd' if backward else 'fwd'}: {plan}")
        emu.configure("a100", sm_count=16)
        for hidden in CLUSTER_PLANS:
            plan = emu.plan(True, hidden, 64)
            assert plan["cluster"] == 1 and "cluster_kernel" not in plan["kernel"], plan
    finally:
        emu.configure()


# Sizes that reach every family's limits (bench/variants.py's candidates are tried on
# each, in their own direction): rows narrower than a warp (no cluster can split
# them); rows of 1-2 warps several per CTA, strided; the
# generic mix with fp32 outputs; element-wise rows (vectorised variants refused);
# float64 (streamed only); 32 per thread, staged rows and clusters of 2 with a short
# last slice; clusters of 2-4; clusters of 4-16 (staged rows too wide for shared
# memory); a 99 KB part without clusters (the backward's rows do not fit there).
VARIANT_CASES = [
    (136, 7, "rms_bf16_mem", "contiguous", "h100"),
    (520, 9, "ln_bf16_pre", "strided", "h100"),
    (1000, 5, "rms_f32_any_mem", "contiguous", "h100"),
    (1001, 5, "ln_mixed_pre", "contiguous", "h100"),
    (40, 3, "ln_fp64", "contiguous", "h100"),
    (8200, 3, "ln_fp32_pre", "contiguous", "h100"),
    (16392, 3, "ln_mixed_pre", "contiguous", "h100"),
    (65536, 2, "rms_bf16_mem", "contiguous", "h100"),
    (16384, 2, "ln_bf16_pre", "contiguous", "sm86"),
]
# Variants whose choices do not apply to their family or direction: refused at the
# call (on H = 1024, which each family could otherwise run), never run as another.
MISAPPLIED_VARIANTS = [("fwd", "rows:cs=2"), ("fwd", "staged:pt=16"), ("fwd", "staged:cps=1"),
                       ("fwd", "cluster:tb=256"), ("fwd", "streamed:pt=16"), ("fwd", "rows:red=columns"),
                       ("bwd", "staged"), ("bwd", "cluster:cps=2"), ("bwd", "streamed:tb=256"),
                       ("bwd", "rows:cs=2"), ("fwd", "cluster:st=2"), ("fwd", "streamed:st=1"), ("bwd", "cluster:st=2"),
                       ("bwd", "streamed:st=1")]
# Texts the parser must refuse: each of its rules.
BAD_VARIANTS = ["tiles", "rule:pt=16", "rows:pt=24", "rows:pt=", "rows:tb=100", "rows:tb=2048",
                "rows:cps=0", "rows:cps=99", "cluster:cs=17", "rows:red=atomic", "rows:warp=2",
                "rows:pt=16,", "rows:pt=12345678", "rows:pt=16,pt=32", "rows:tb=0256", "cluster:cs=02",
                "rows:st=0", "rows:st=3", "rows:st=", "rows:st=2,st=2"]


def row_threads_for(hidden: int, per_thread: int) -> int:
    """Threads per row of the rows kernels (csrc/kernels/rows.cuh), the test's own copy."""
    t = -(-hidden // per_thread)
    return -(-t // 32) * 32 if t >= 32 else 1 << (t - 1).bit_length()


def variant_agrees(asked: str, ran: str, hidden: int) -> bool:
    """Whether the variant a launch ran (every choice filled in) is the one asked for:
    the same family, every choice asked for with its value ("rule": anything), except
    tb, which the rows kernels round to whole rows (tb // threads per row, at least one)."""
    if asked == "rule":
        return bool(ran)
    family, _, choices = asked.partition(":")
    ran_family, _, ran_choices = ran.partition(":")
    have = dict(c.split("=") for c in ran_choices.split(",") if c)
    want = dict(c.split("=") for c in choices.split(",") if c)
    if "tb" in want:
        rt = row_threads_for(hidden, int(have.get("pt", 4)))
        want["tb"] = str(max(1, int(want["tb"]) // rt) * rt)
    return family == ran_family and all(have.get(k) == v for k, v in want.items())


def _refused(emu, entry, direction, name, case) -> bool:
    """Runs one case under the override; True if the variant was refused (with a reason
    naming it), False if it ran as asked and within the reference's bounds."""
    hidden, rows, flag, layout, profile = case
    emu.configure(profile, sm_count=16 if hidden > 16384 else 3)
    with entry.override(direction, name):
        try:
            check(emu, rows, hidden, FLAGS[flag], layout, directions=(direction,))
        except cuda_emulator.EmulatorError as err:
            assert name != "rule" and f"the tuning variant '{name}'" in str(err), (name, case, err)
            return True
    got = entry.last(direction)
    assert variant_agrees(name, got, hidden), (direction, name, case, got)
    return False


# The rows kernels' ring (st=2, csrc/kernels/ring.cuh), forward at 16 and 32 elements
# per thread and backward at 16: every row layout (1 thread per row up to 512 threads
# per row), every flag set with 16-byte vectors, and row counts around the persistent
# grid's step (a CTA's row groups x CTAs): fewer rows than one CTA's groups, one step
# exactly, several steps with a short last one, so the ring wraps, idle groups skip
# their copies and the last iteration commits an empty group.
RING_HIDDEN = {16: (8, 24, 136, 520, 1000, 1536, 5120, 8192), 32: (8, 40, 1000, 2056, 8200, 12288, 16384)}
RING_PER_THREAD = {"fwd": (16, 32), "bwd": (16,)}
RING_FLAGS = ("ln_mixed_pre", "ln_bf16_pre", "rms_fp16_mixed", "ln_bf16_f32w", "rms_bf16_mem", "ln_fp16_plain",
              "ln_fp32_pre", "ln_f32_any", "rms_fp32", "rms_f32_any_mem")


def ring_cases(per_thread, quick=False, seed=0):
    """(hidden, rows, flag, layout, threads per CTA aimed for) of check_ring at
    `per_thread`: per hidden size, rows drawn around the step of 3 SMs' CTAs; flags
    and layouts in turn, so every flag set meets several row layouts."""
    rng = random.Random(seed + per_thread)
    out = []
    k = 0
    for hidden in RING_HIDDEN[per_thread]:
        rt = row_threads_for(hidden, per_thread)
        for tb in ((512,) if quick else (256, 512)):
            rpc = max(1, tb // rt)
            step = 3 * rpc  # one CTA per SM; a second where it fits only adds CTAs
            counts = [rng.randint(1, rpc), rng.randint(step * 2 + 1, step * 3)] + (
                [] if quick else [step, rng.randint(step + 1, 2 * step)])
            if hidden >= 5120:  # a row is a CTA: keep the emulated work small
                counts = [2, 7] if quick else [1, 3, 7]
            for rows in counts:
                out.append((hidden, rows, RING_FLAGS[k % len(RING_FLAGS)], ("contiguous", "strided")[k % 2], tb))
                k += 1
    return out


def check_ring(emu, quick=False):
    """The rows kernels with their ring (st=2) against the reference's bounds and
    bitwise against the same kernel without it (st=1: the same arithmetic, so any
    difference is a copy read too early, into the wrong stage or row, or of the wrong
    row's rstd). A mix whose ring does not fit in shared memory may refuse, saying so;
    an all-16-bit one may not; misaligned rows refuse st=2, and so does the backward
    at 32 per thread, naming the rule."""
    from bench import variants

    entry = variants.Entry(emu.lib)
    try:
        for direction, widths in RING_PER_THREAD.items():
            for pt in widths:
                for hidden, rows, flag, layout, tb in ring_cases(pt, quick):
                    _check_ring_case(emu, entry, direction, pt, hidden, rows, flag, layout, tb)
        emu.configure("h100", sm_count=3)
        for direction, rule in (("fwd", "rows:tb=256,st=1"), ("bwd", "rows:tb=512,red=columns,st=1")):
            with entry.override(direction, "rows:st=2"):
                try:
                    check(emu, 5, 1024, FLAGS["ln_mixed_pre"], "offset", directions=(direction,))
                    raise AssertionError(f"{direction}: st=2 ran on misaligned rows")
                except cuda_emulator.EmulatorError as err:
                    assert "st=2 needs vectorised rows" in str(err), err
            # the rule there: the element-wise kernel, recorded with no pt and one stage
            check(emu, 5, 1024, FLAGS["ln_mixed_pre"], "offset", directions=(direction,))
            assert entry.last(direction) == rule, (direction, entry.last(direction))
        with entry.override("bwd", "rows:st=2"):  # the rule's 32 per thread there
            try:
                check(emu, 2, 12288, FLAGS["ln_bf16_pre"], directions=("bwd",))
                raise AssertionError("st=2 ran with 32 elements per thread")
            except cuda_emulator.EmulatorError as err:
                assert "st=2 needs 16 elements per thread" in str(err), err
    finally:
        entry.set("fwd", "")
        entry.set("bwd", "")
        emu.configure()


def _check_ring_case(emu, entry, direction, pt, hidden, rows, flag, layout, tb):
    emu.configure("h100", sm_count=3)
    got = {}
    f = FLAGS[flag]
    # The ring's LayerNorm backward with the forward's mean takes its sums in one
    # reduction (other arithmetic): within the bounds here, bitwise against st=1
    # without the mean, where both reduce twice.
    shifted = direction == "bwd" and not f.rms and not f.memory_efficient
    if shifted:
        with entry.override(direction, f"rows:pt={pt},tb={tb},st=2"):
            try:
                check(emu, rows, hidden, f, layout, seed=rows, directions=(direction,), with_mean=True)
            except cuda_emulator.EmulatorError as err:
                wide = torch.float32 in (f.x, f.residual, f.weight, f.bias)
                assert wide and "shared memory" in str(err), (direction, hidden, rows, flag, err)
    for stages in (1, 2):
        name = f"rows:pt={pt},tb={tb},st={stages}"
        with entry.override(direction, name):
            try:
                got[stages] = check(emu, rows, hidden, f, layout, seed=rows, directions=(direction,),
                                    with_mean=False if shifted else None)
            except cuda_emulator.EmulatorError as err:
                wide = torch.float32 in (f.x, f.residual, f.weight, f.bias)
                assert stages == 2 and wide and "shared memory" in str(err), (direction, name, hidden, rows, flag, err)
                return
            assert variant_agrees(name, entry.last(direction), hidden), (name, entry.last(direction))
    for out, t in got[1].items():
        assert torch.equal(t, got[2][out]), (
            f"{direction} {flag} H={hidden} rows={rows} {layout} pt={pt} tb={tb}: {out} differs between st=1 and "
            f"st=2 (max |diff| {(t.double() - got[2][out].double()).abs().max().item():.3g})")


def _inplace_case(emu, rows, hidden, flags: Flags, layout, seed):
    """The in-place forward (y over x, x + residual over residual) against the same
    call writing fresh outputs: bitwise equal, and the emulator fails any read of an
    element after a kernel overwrote it."""
    gen = torch.Generator().manual_seed(seed)
    layout = "contiguous" if layout == "strided" else layout  # in place needs dense rows
    x = _tensor(rows, hidden, flags.x, gen, layout, mean=3.0)
    residual = _tensor(rows, hidden, flags.residual, gen, layout)
    weight = _vector(hidden, flags.weight, gen)
    bias = _vector(hidden, flags.bias, gen)
    eps = 0.1 if flags.x == torch.float32 else 1e-5
    want = emu.fwd(x, residual, weight, bias, eps, flags.rms, True, residual.dtype)
    got = emu.fwd_inplace(x, residual, weight, bias, eps, flags.rms)
    for name, a, b in zip(("x (y)", "residual (residual_out)", "rstd"), got, want[:3]):
        assert torch.equal(a, b), (
            f"{flags.name} H={hidden} rows={rows} {layout}: in place, {name} differs from the call with "
            f"fresh outputs (max |diff| {(a.double() - b.double()).abs().max().item():.3g})")


def check_each_tensor_alone(emu):
    """One tensor at a time, where every other one takes the vectorised all-bf16 fast
    path (H = 1024): each tensor the kernels vectorise one element past a 16-byte
    boundary, and each output with a dtype of its own in fp32. The plan must see it:
    the alignment check and the dtype-mix match walk the argument lists of
    csrc/kernels/params.h, so a tensor they skip is read or written with the wrong
    vectors or the wrong element type."""
    rows, hidden, eps, bf16 = 10, 1024, 1e-5, torch.bfloat16
    gen = torch.Generator().manual_seed(11)

    def rows_of(name, off, **kw):
        return _tensor(rows, hidden, bf16, gen, "offset" if name == off else "contiguous", **kw)

    def vector(name, off):
        v = _vector(hidden + 1, bf16, gen)
        return v[1:] if name == off else v[:hidden]

    def placed(t, name, off):
        """t with its storage one element past a 16-byte boundary if name == off."""
        if name != off:
            return t.contiguous()
        base = torch.empty(t.numel() + 1, dtype=t.dtype)
        out = base[1:].view(t.shape)
        out.copy_(t)
        return out

    fwd_cases = [(n, bf16) for n in (None, "x", "residual", "weight", "bias", "y", "residual_out")]
    for off, res_dtype in fwd_cases + [(None, torch.float32)]:
        x, residual = rows_of("x", off, mean=3.0), rows_of("residual", off)
        weight, bias = vector("weight", off), vector("bias", off)
        out_offsets = {off: 2} if off in ("y", "residual_out") else None
        try:
            y, res, rstd, mean = emu.fwd(x, residual, weight, bias, eps, False, True, res_dtype,
                                         out_offsets=out_offsets, store_mean=True)
            numerics.check_forward({"y": y, "residual_out": res, "rstd": rstd, "mean": mean}, x, residual,
                                   weight, bias, eps, False, True, store_mean=True)
        except AssertionError as err:
            where = f"{off} misaligned" if off else "all aligned"
            raise AssertionError(f"forward, {where}, residual_out in {res_dtype}: {err}") from None

    bwd_cases = [(n, bf16) for n in ("dy", "dresidual_out", "saved", "weight", "bias", "dx", "dresidual")]
    for off, dres_dtype in bwd_cases + [(None, torch.float32)]:
        # x and residual only make the forward's saved row and rstd, from the reference
        x = _tensor(rows, hidden, bf16, gen, "contiguous", mean=3.0)
        residual = _tensor(rows, hidden, bf16, gen, "contiguous")
        weight, bias = vector("weight", off), vector("bias", off)
        (_, s64, rstd64), _ = numerics.forward_reference(x, residual, weight, bias, eps, False)
        saved = placed(s64.to(bf16), "saved", off)
        dy, dres_out = rows_of("dy", off, scale=1 / 8), rows_of("dresidual_out", off, scale=1 / 8)
        out_offsets = {off: 2} if off in ("dx", "dresidual") else None
        try:
            dx, dres, dw, db = emu.bwd(dy, dres_out, saved, rstd64.float(), weight, bias, False, False, dres_dtype,
                                       out_offsets=out_offsets)
            numerics.check_backward({"dx": dx, "dresidual": dres, "dweight": dw, "dbias": db}, dy, dres_out,
                                    saved, rstd64.float(), weight, bias, False, False)
        except AssertionError as err:
            where = f"{off} misaligned" if off else "all aligned"
            raise AssertionError(f"backward, {where}, dresidual in {dres_dtype}: {err}") from None


def check_inplace(emu, quick=False):
    """The in-place forward on every launch path (each PATHS entry's flag sets with a
    residual, under two schedules; quick: the first, under one), and on the ring (st=2),
    whose next rows' copies are in flight while this row is written."""
    from bench import variants

    for path in PATHS:
        hidden, rows, names, layout = path[:4]
        names = [n for n in names if FLAGS[n].residual is not None][: 1 if quick else None]
        emu.configure(*path[4:])
        try:
            for name in names:
                first = "cta_greedy" if uses_clusters(path) else "warp_greedy"
                for schedule in (first,) if quick else (first, "round_robin"):
                    emu.schedule(schedule, seed=hidden)
                    _inplace_case(emu, rows, hidden, FLAGS[name], layout, seed=hidden + rows)
        finally:
            emu.schedule("round_robin")
            emu.configure()
    entry = variants.Entry(emu.lib)
    emu.configure("h100", sm_count=3)
    try:
        for tb, hidden, rows in ((256, 1024, 9), (512, 4096, 7)):
            with entry.override("fwd", f"rows:pt=16,tb={tb},st=2"):
                _inplace_case(emu, rows, hidden, FLAGS["ln_bf16_pre"], "contiguous", seed=rows)
                assert variant_agrees(f"rows:pt=16,tb={tb},st=2", entry.last("fwd"), hidden), entry.last("fwd")
    finally:
        entry.set("fwd", "")
        emu.configure()


# The ring kernels (16 per thread), which take LayerNorm's sums in one reduction.
SHIFT_VARIANTS = ("rows:pt=16,tb=256,st=2", "rows:pt=16,tb=512,st=2")


def check_shift(emu):
    """The ring's LayerNorm backward takes its three row sums in one reduction of
    u = v - mean, the forward's mean. On rows far from zero (fp32, means +-1e5 to 4e6,
    spread 1: u is exact there) a wrong shift shows: with the forward's mean dx is
    within ~1e-7 of its largest value, while unshifted sums lose ~1e-2 to
    cancellation (the rule's two reductions, which centre on a mean summed in fp32,
    are within 2e-4 there, inside the reference's bounds). Also the memory-efficient
    backward and RMSNorm's single sum, which take no mean, through the same kernels."""
    from bench import variants

    entry = variants.Entry(emu.lib)
    gen = torch.Generator().manual_seed(11)
    emu.configure("h100", sm_count=3)
    try:
        for hidden in (1000, 4096):
            # Several iterations of the persistent CTAs, each row at its own mean (so the
            # next row's mean in place of this one's shows too).
            rows = 40
            offsets = 1e5 * torch.arange(1, rows + 1, dtype=torch.float64).unsqueeze(1) * (-1) ** torch.arange(rows).unsqueeze(1)
            x = (torch.randn(rows, hidden, generator=gen, dtype=torch.float64) + offsets).float()
            dy = torch.randn(rows, hidden, generator=gen)
            w = torch.randn(hidden, generator=gen)
            b = torch.randn(hidden, generator=gen)
            y, _, rstd, mean = emu.fwd(x, None, w, b, 1e-5, False, False, torch.float32, store_mean=True)
            _, _, rms_rstd, _ = emu.fwd(x, None, w, None, 1e-5, True, False, torch.float32)
            cases = [("mean", x, rstd, mean, False, False), ("memory-efficient", y, rstd, None, False, True),
                     ("rms", x, rms_rstd, None, True, False)]
            for what, saved, r, m, rms, mem in cases:
                ds, _, _ = reference.backward(dy.double(), None, saved.double(), r.double(), w.double(),
                                              None if rms else b.double(), rms, mem)
                for name in SHIFT_VARIANTS:
                    with entry.override("bwd", name):
                        dx = emu.bwd(dy, None, saved, r, w, None if rms else b, rms, mem, None, mean=m)[0]
                    err = ((dx.double() - ds).abs().max() / ds.abs().max()).item()
                    assert err < 1e-6, f"H={hidden} {what} {name}: dx off by {err:.3g} of its largest value"
    finally:
        entry.set("bwd", "")
        emu.configure()


# RESIDUAL_FUSED_VARIANT values: (value, what a forward+backward does: the variants
# each direction ran, or a text the refusal contains).
VARIANT_SETTINGS = [
    ("fwd=streamed;bwd=rows:pt=32", ("streamed", "rows:pt=32,tb=512,red=columns,st=1")),
    ("bwd=streamed", ("rows:pt=16,tb=256,st=1", "streamed:red=columns")),
    ("rows:pt=32,tb=128", ("rows:pt=32,tb=128,st=1", "rows:pt=32,tb=128,red=columns,st=1")),
    ("rows:pt=24", "RESIDUAL_FUSED_VARIANT='rows:pt=24': pt (elements per thread) must be 16 or 32"),
    ("fwd=rows;xyz=streamed", "expected '<variant>' or 'fwd=<variant>;bwd=<variant>', got 'xyz=streamed'"),
    ("fwd=rows;bwd=tiles", "unknown variant family 'tiles'"),
    ("fwd=streamed;fwd=rows", "fwd is given twice"),
]


def check_variant_environment(emu):
    """The RESIDUAL_FUSED_VARIANT setting (applied as the first call applies the
    variable): each direction runs what it says, and a value that does not parse
    refuses every call, saying why, rather than being ignored."""
    apply = emu.lib.residual_fused_apply_variant_environment
    apply.argtypes = [ctypes.c_char_p]
    from bench import variants

    entry = variants.Entry(emu.lib)
    try:
        for value, want in VARIANT_SETTINGS:
            emu.configure("h100", sm_count=3)
            apply(value.encode())
            try:
                check(emu, 5, 1024, FLAGS["ln_bf16_pre"])
                got = (entry.last("fwd"), entry.last("bwd"))
            except cuda_emulator.EmulatorError as err:
                got = str(err)
            assert (got == want if isinstance(want, tuple) else want in str(got)), (value, got, want)
    finally:
        apply(None)
        emu.configure()


def table_variant(rows, device, direction, rms, prenorm, mix, hidden):
    """The variant a parsed tuned table (bench/make_table.parse_table) lists for a call,
    or None where it lists none."""
    for r in rows:
        if (r["device"], r["direction"], r["rms"], r["prenorm"], r["mix"]) == (device, direction, rms, prenorm, mix) \
                and r["lo"] <= hidden <= r["hi"]:
            return r["variant"]
    return None


def check_tuned_table(emu, table_path=None, hiddens=(1024, 16392)):
    """Every GPU the tuned table lists (csrc/kernels/tuned_table.h, or the one the
    library was built with): all-bf16 pre-norm LayerNorm calls on an emulated H100 of
    that name run the table's variant, or the rule where the table says "rule" (the
    same variant as on a GPU of another name) or its variant cannot run the call; an
    all-fp32 call (a mix the table may not list) runs as the table or the rule says;
    a failed name query runs the rule, leaves no error behind and is asked again."""
    from bench import make_table, variants

    entry = variants.Entry(emu.lib)
    with open(table_path or os.path.join(cuda_emulator.KERNELS, "tuned_table.h")) as f:
        text = f.read()
    rows = make_table.parse_table(text)
    devices = sorted({r["device"] for r in rows if r["device"]})
    assert bool(entry.table_source()) == bool(devices) and all(d in entry.table_source() for d in devices)
    other = "a GPU the table does not list"
    try:
        for device in devices:
            for hidden, flag in [(h, "ln_bf16_pre") for h in hiddens] + [(hiddens[0], "ln_fp32_pre")]:
                mix = variants.TABLE_MIXES.index("fp32" if flag == "ln_fp32_pre" else "bf16")
                ran = {}
                for name in (device, other):
                    emu.configure("h100", sm_count=16)
                    emu.set_device_name(name)
                    check(emu, 2, hidden, FLAGS[flag])
                    ran[name] = (entry.last("fwd"), entry.last("bwd"))
                for d, direction in enumerate(("fwd", "bwd")):
                    want = table_variant(rows, device, direction, False, True, mix, hidden)
                    got, rule = ran[device][d], ran[other][d]
                    assert got == rule if want in (None, "rule") else (
                        variant_agrees(want, got, hidden) or got == rule), (device, direction, hidden, flag, want, got,
                                                                              rule)
            emu.configure("h100", sm_count=16)
            emu.set_device_name(device)
            emu.inject("device_properties", after=0)
            check(emu, 2, hiddens[0], FLAGS["ln_bf16_pre"])  # the rule; finish() sees nothing pending
            emu.clear_injections()
            check(emu, 2, hiddens[0], FLAGS["ln_bf16_pre"])
    finally:
        emu.clear_injections()
        emu.configure()


def check_variants(emu):
    """Every candidate variant on VARIANT_CASES (an H100 of 3 SMs, so persistent CTAs
    loop, or 16 for clusters of up to 16): it runs, within the reference's bounds and
    as asked, or it is refused with a reason naming it; each runs on at least one case.
    Misapplied choices are refused at the call, bad texts when set."""
    from bench import variants

    entry = variants.Entry(emu.lib)
    ran = set()
    try:
        for direction, names in variants.CANDIDATES.items():
            for name in names:
                for case in VARIANT_CASES:
                    if not _refused(emu, entry, direction, name, case):
                        ran.add((direction, name))
        never = [k for k in variants.all_candidates() if k not in ran]
        assert not never, f"candidates no case runs: {never}"
        for direction, name in MISAPPLIED_VARIANTS:
            assert _refused(emu, entry, direction, name, (1024, 3, "ln_bf16_pre", "contiguous", "h100")), name
        for text in BAD_VARIANTS:
            try:
                entry.set("fwd", text)
            except variants.VariantError:
                continue
            raise AssertionError(f"variant {text!r} was accepted")
    finally:
        entry.set("fwd", "")
        entry.set("bwd", "")
        emu.configure()


def run_all(emu, quick=False) -> None:
    """Everything, stopping at the first failure. `quick`: one flag set and two
    schedules per path, and the sweep only up to H = 20000 (where the shared-memory
    limits bite)."""
    hi = 20000 if quick else MAX_SWEEP_HIDDEN
    if emu.resources_loaded:
        for profile in cuda_emulator.PROFILES:
            for aligned in (True, False):
                sweep(emu, profile, aligned, hi=hi)
    if quick:  # per path its first flag set and its first with fp32 outputs, two orders
        for path in PATHS:
            # a CTA running ahead of its cluster peers shows a missing cluster barrier
            first = "cta_greedy" if uses_clusters(path) else "warp_greedy"
            names = path[2][:1] + [n for n in path[2][1:] if FLAGS[n].x == torch.float32][:1]
            check_path(emu, (*path[:2], names, *path[3:]), (first, "round_robin"))
    else:
        for path in PATHS:
            check_path(emu, path)
    check_fallback_and_persistence(emu)
    check_staged_parameter_lengths(emu)
    check_uncached_devices(emu)
    check_huge_row_counts(emu)
    check_plan_families(emu)
    check_code_without_clusters(emu)
    if emu.resources_loaded:
        check_cluster_plans(emu)
        check_failed_queries(emu)
    check_failed_launch_is_cleared(emu)
    check_workspace_mismatch_is_refused(emu)
    check_variants(emu)
    check_ring(emu, quick)
    check_shift(emu)
    check_inplace(emu, quick)
    check_each_tensor_alone(emu)
    check_variant_environment(emu)
    check_tuned_table(emu)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", required=True, help="an emulator library (cuda_emulator.build)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from tools import cubin

    try:
        kernels = cubin.build()
    except FileNotFoundError:
        kernels = None
    emu = cuda_emulator.Emulator(args.lib, kernels)
    try:
        run_all(emu, quick=args.quick)
    except AssertionError as err:
        print(f"FAILED: {err}")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
