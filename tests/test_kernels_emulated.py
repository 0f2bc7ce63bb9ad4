"""The CUDA kernels, run on the CPU by tests/emulator, against the reference ops.

No GPU is needed: the kernel sources and their launch plans are compiled by the host
compiler with an emulation of threads, barriers, warp shuffles and shared memory
(tests/cuda_emulator.py). Every launch path is covered: row groups, whole-block rows,
staged and streamed rows, 16-byte and element-wise vectors, float64, the
shared-memory fallback, and the deterministic weight-gradient reduction. Outputs are
poisoned and guarded, so unwritten elements and stray writes fail. This checks
indexing, coverage and arithmetic; speed and hardware behaviour need a GPU.
"""

import dataclasses

import pytest
import torch

import cuda_emulator

OPS = torch.ops.residual_fused
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    try:
        lib = cuda_emulator.build(str(tmp_path_factory.mktemp("emulator")))
    except FileNotFoundError as why:
        pytest.skip(str(why))
    e = cuda_emulator.Emulator(lib)
    yield e
    e.configure()


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
}

TOL = {torch.bfloat16: (1.6e-2, 2e-2), torch.float16: (2e-3, 2e-3), torch.float32: (2e-5, 2e-5),
       torch.float64: (1e-12, 1e-12)}


def _tensor(rows, hidden, dtype, gen, layout):
    """[rows, hidden] with layout 'contiguous', 'strided' (wider rows) or 'offset'
    (storage starts one element in: not 16-byte aligned)."""
    if dtype is None:
        return None
    pad = {"contiguous": 0, "strided": 8, "offset": 0}[layout]
    extra = 1 if layout == "offset" else 0
    base = torch.randn(rows * (hidden + pad) + extra, generator=gen, dtype=torch.float64)
    return base.to(dtype)[extra:].view(rows, hidden + pad)[:, :hidden]


def _vector(hidden, dtype, gen, away_from_zero=False):
    if dtype is None:
        return None
    v = torch.randn(hidden, generator=gen, dtype=torch.float64)
    if away_from_zero:
        v = torch.sign(v) * (0.5 + v.abs().clamp(max=1.0))
    return v.to(dtype)


def _close(got, want, name):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    rtol, atol = TOL[got.dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=name)


def check(emu, rows, hidden, flags: Flags, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = flags
    x = _tensor(rows, hidden, f.x, gen, layout)
    residual = _tensor(rows, hidden, f.residual, gen, layout)
    weight = _vector(hidden, f.weight, gen, away_from_zero=f.memory_efficient)
    bias = _vector(hidden, f.bias, gen)
    out_dtype = f.residual or f.x
    args = (x, residual, weight, bias, 1e-5, f.rms, f.store, out_dtype)
    want = OPS.add_norm_fwd(*args)
    got = emu.fwd(*args)
    _close(got[0], want[0], "y")
    if f.store:
        _close(got[1], want[1], "residual_out")
    _close(got[2], want[2], "rstd")

    dy = _tensor(rows, hidden, f.x, gen, layout) / 8
    dres_out = _tensor(rows, hidden, out_dtype, gen, "contiguous") / 8 if f.dres_out else None
    saved = want[0] if f.memory_efficient else (want[1] if f.store else x)
    dres_dtype = residual.dtype if residual is not None and residual.dtype != x.dtype else None
    bargs = (dy, dres_out, saved, want[2], weight, bias, f.rms, f.memory_efficient, dres_dtype)
    bwant = OPS.add_norm_bwd(*bargs)
    bgot = emu.bwd(*bargs)
    for name, g, w, present in zip(("dx", "dresidual", "dweight", "dbias"), bgot, bwant,
                                   (True, dres_dtype is not None, weight is not None, bias is not None)):
        if present:
            _close(g, w, name)
    return bgot


# (hidden, rows, flag sets, layout): one or more per launch path of csrc/kernels.
PATHS = [
    # 16-byte vectors (hidden % 8 == 0, aligned)
    (8, 37, ["ln_mixed_pre", "rms_bf16_mem", "ln_fp16_plain"], "contiguous"),  # 8-lane groups
    (128, 10, ["ln_mixed_pre", "rms_bf16_mem"], "contiguous"),                # 16-lane groups
    (512, 10, ["ln_mixed_pre", "ln_fp16_plain"], "strided"),                  # warp, 2 vectors
    (1000, 10, ["ln_mixed_pre", "rms_bf16_mem", "ln_fp16_plain"], "contiguous"),  # warp, 4 vectors
    (5120, 4, ["ln_mixed_pre", "rms_bf16_mem"], "contiguous"),  # whole-block rows
    (8200, 3, ["ln_mixed_pre", "rms_bf16_mem"], "strided"),     # fwd staged, bwd whole-block
    (16384, 3, ["ln_mixed_pre", "rms_bf16_mem"], "contiguous"),  # fwd staged, bwd whole-block max
    (16392, 3, ["ln_mixed_pre"], "contiguous"),                 # bwd streamed (vec8)
    (49160, 2, ["rms_bf16_mem"], "contiguous"),                 # fwd streamed (vec8)
    # element-wise (odd sizes, misaligned rows)
    (1, 10, ["ln_mixed_pre", "rms_bf16_mem"], "contiguous"),
    (41, 37, ["ln_mixed_pre", "rms_bf16_mem", "ln_fp16_plain"], "contiguous"),
    (257, 10, ["ln_mixed_pre", "ln_fp16_plain"], "contiguous"),
    (1024, 10, ["ln_mixed_pre", "rms_bf16_mem"], "offset"),
    (3001, 4, ["ln_mixed_pre", "rms_bf16_mem"], "contiguous"),
    (5125, 3, ["ln_mixed_pre", "rms_bf16_mem"], "contiguous"),  # streamed, element-wise
    # float64 (gradcheck's path) and fp32
    (6, 5, ["ln_fp64"], "contiguous"),
    (769, 4, ["ln_fp64", "ln_fp64_mixed", "rms_fp32"], "contiguous"),
]


@pytest.mark.parametrize("hidden,rows,flag_names,layout", PATHS,
                         ids=[f"H{p[0]}-{p[3]}" for p in PATHS])
def test_kernels_match_reference(emu, hidden, rows, flag_names, layout):
    for name in flag_names:
        check(emu, rows, hidden, FLAGS[name], layout, seed=hidden)


def test_weight_gradients_are_bitwise_deterministic(emu):
    first = check(emu, 10, 1000, FLAGS["ln_mixed_pre"], seed=1)
    second = check(emu, 10, 1000, FLAGS["ln_mixed_pre"], seed=1)
    for a, b in zip(first, second):
        assert a is None or torch.equal(a, b)


def test_small_shared_memory_falls_back_to_streamed(emu):
    """A GPU with 99 KB of shared memory per block (sm_86/sm_89) cannot run the staged
    forward or whole-block backward at H = 16384; the streamed kernels take over."""
    emu.configure(device=1, max_smem=99 * 1024)
    try:
        check(emu, 3, 16384, FLAGS["ln_mixed_pre"])
    finally:
        emu.configure()


def test_many_rows_per_persistent_cta(emu):
    emu.configure(device=2, sm_count=1)  # one CTA loops over every row
    try:
        check(emu, 23, 2048, FLAGS["rms_bf16_mem"])
        check(emu, 9, 4097, FLAGS["ln_mixed_pre"])
    finally:
        emu.configure()
