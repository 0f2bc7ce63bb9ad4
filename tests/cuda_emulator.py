"""Run the CUDA kernels of csrc/kernels on the CPU, through tests/emulator.

The kernel sources, their launch plans and dispatch.cu are compiled unchanged by the
host C++ compiler with tests/emulator/cuda_emulation.h, which maps threads, block
barriers, warp shuffles and shared memory onto std::threads. :class:`Emulator`
mirrors the two ops (same arguments and outputs as ``torch.ops.residual_fused``) on
2-D CPU tensors. Threads run as cooperative fibers on one OS thread. Outputs are carved out of NaN-filled buffers with guard regions on
both sides, so unwritten elements and out-of-bounds writes both show.
"""

import ctypes
import os
import shutil
import subprocess
from typing import Optional

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KERNELS = os.path.join(ROOT, "csrc", "kernels")
EMULATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulator")
SOURCES = ["fwd_rows.cu", "fwd_streamed.cu", "bwd_rows.cu", "bwd_streamed.cu", "dispatch.cu"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
GUARD = 64  # elements of poison on each side of every output


def cuda_include_dir() -> Optional[str]:
    """The CUDA headers (types and fp16/bf16 conversions only; nothing is linked)."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for base in candidates:
        if base and os.path.exists(os.path.join(base, "include", "cuda_bf16.h")):
            return os.path.join(base, "include")
    return None


def build(out_dir: str) -> str:
    """Compile the emulated kernels into a shared library; returns its path."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    include = cuda_include_dir()
    if cxx is None or include is None:
        raise FileNotFoundError("needs a C++17 compiler and the CUDA headers")
    lib = os.path.join(out_dir, "residual_fused_emulated.so")
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-w", "-DRESIDUAL_FUSED_HOST_EMULATION",
           "-include", os.path.join(EMULATOR, "cuda_emulation.h"), "-I", include, "-I", KERNELS,
           "-I", EMULATOR, "-x", "c++"] + [os.path.join(KERNELS, s) for s in SOURCES] + [
           "-x", "none", os.path.join(EMULATOR, "emulator.cpp"), "-o", lib, "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"building the emulator failed:\n{proc.stderr[-4000:]}")
    return lib


def _ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _code(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else DTYPE_CODE[t.dtype]


def _row_stride(t: Optional[torch.Tensor]) -> int:
    if t is None:
        return 0
    assert t.dim() == 2 and (t.stride(1) == 1 or t.size(1) == 1), "2-D, last dim contiguous"
    return t.stride(0)


class Guarded:
    """An output tensor inside a NaN buffer with GUARD poisoned elements on each side."""

    def __init__(self, shape, dtype):
        n = 1
        for s in shape:
            n *= s
        self.buffer = torch.full((n + 2 * GUARD,), float("nan"), dtype=dtype)
        self.tensor = self.buffer[GUARD:GUARD + n].view(shape)

    def guards_intact(self) -> bool:
        return bool(torch.isnan(self.buffer[:GUARD]).all() and torch.isnan(self.buffer[-GUARD:]).all())


class Emulator:
    def __init__(self, lib_path: str):
        self.lib = ctypes.CDLL(lib_path)
        i64, i32, dbl, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
        self.lib.emu_fwd.argtypes = [i64, i32, i32, dbl, ptr, i64, i32, ptr, i64, i32, ptr, i32,
                                     ptr, i32, ptr, ptr, i32, ptr]
        self.lib.emu_bwd.argtypes = [i64, i32, i32, i32, ptr, i64, i32, ptr, i64, i32, ptr, i64,
                                     i32, ptr, ptr, i32, ptr, i32, ptr, ptr, i32, ptr, ptr]
        self.lib.emu_configure.argtypes = [i32, i32, i32]
        self.configure()

    def configure(self, device: int = 0, sm_count: int = 3, max_smem: int = 227 * 1024) -> None:
        """Emulate ``device`` with these attributes (use a new index per configuration:
        the launch code caches attributes per device, as it may on real GPUs)."""
        self.lib.emu_configure(device, sm_count, max_smem)

    @staticmethod
    def _check(outputs, status):
        assert status == 0, f"emulated launch failed with cudaError {status}"
        for out in outputs:
            if out is not None:
                assert out.guards_intact(), "a kernel wrote outside its output"

    def fwd(self, x, residual, weight, bias, eps, is_rms_norm, store_residual_out, residual_out_dtype):
        rows, hidden = x.shape
        stats = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = Guarded((rows, hidden), x.dtype)
        res = Guarded((rows, hidden), residual_out_dtype) if store_residual_out else None
        rstd = Guarded((rows,), stats)
        status = self.lib.emu_fwd(
            rows, hidden, int(is_rms_norm), eps, _ptr(x), _row_stride(x), _code(x), _ptr(residual),
            _row_stride(residual), _code(residual), _ptr(weight), _code(weight), _ptr(bias),
            _code(bias), _ptr(y.tensor), _ptr(None if res is None else res.tensor),
            DTYPE_CODE[residual_out_dtype], _ptr(rstd.tensor))
        self._check((y, res, rstd), status)
        return y.tensor, (None if res is None else res.tensor), rstd.tensor

    def bwd(self, dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm, memory_efficient,
            dresidual_dtype):
        rows, hidden = dy.shape
        dx = Guarded((rows, hidden), dy.dtype)
        dres = None if dresidual_dtype is None else Guarded((rows, hidden), dresidual_dtype)
        dw = None if weight is None else Guarded((hidden,), weight.dtype)
        db = None if bias is None else Guarded((hidden,), bias.dtype)
        status = self.lib.emu_bwd(
            rows, hidden, int(is_rms_norm), int(memory_efficient), _ptr(dy), _row_stride(dy),
            _code(dy), _ptr(dresidual_out), _row_stride(dresidual_out), _code(dresidual_out),
            _ptr(saved), _row_stride(saved), _code(saved), _ptr(rstd), _ptr(weight), _code(weight),
            _ptr(bias), _code(bias), _ptr(dx.tensor), _ptr(None if dres is None else dres.tensor),
            DTYPE_CODE.get(dresidual_dtype, 0), _ptr(None if dw is None else dw.tensor),
            _ptr(None if db is None else db.tensor))
        self._check((dx, dres, dw, db), status)
        return tuple(None if g is None else g.tensor for g in (dx, dres, dw, db))
