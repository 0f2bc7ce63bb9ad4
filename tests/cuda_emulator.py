"""Run the CUDA kernels of csrc/kernels on the CPU, through tests/emulator.

The kernel sources, their launch plans and dispatch.cu are compiled unchanged by the
host C++ compiler with tests/emulator/cuda_emulation.h (threads as fibers under a
chosen schedule, CTAs of a wave interleaved, barriers and shuffles checked for
agreement, per-CTA poisoned shared memory) and the UndefinedBehaviorSanitizer in
trap mode. :class:`Emulator` mirrors the two ops (same arguments and outputs as
``torch.ops.residual_fused``) on 2-D CPU tensors. Every tensor a kernel sees is
copied into guarded memory (inaccessible pages on both sides, bytes flush against
one), outputs are poisoned with NaN, and launches obey the resources nvcc reported
for the kernels on a chosen GPU profile (H100, A100, sm_86).
"""

import concurrent.futures
import ctypes
import functools
import itertools
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KERNELS = os.path.join(ROOT, "csrc", "kernels")
EMULATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulator")
KERNEL_SOURCES = ["fwd_rows.cu", "fwd_streamed.cu", "bwd_rows.cu", "bwd_streamed.cu", "cluster_rows.cu",
                  "dispatch.cu"]
RUNTIME_SOURCES = ["scheduler.cpp", "device.cpp", "memory.cpp", "api.cpp"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
SCHEDULES = {"round_robin": 0, "reverse": 1, "random": 2, "warp_greedy": 3, "cta_greedy": 4}
PROFILES = ("h100", "a100", "sm86")
INJECT = {"set_attribute": 0, "occupancy": 1, "func_attributes": 2, "launch": 3}
SANITIZE = ["-fsanitize=undefined", "-fno-sanitize=vptr", "-fsanitize-undefined-trap-on-error"]


class EmulatorError(AssertionError):
    """An emulated launch failed: the message says which kernel, thread and why."""


def cuda_include_dir() -> Optional[str]:
    """The CUDA headers (types and fp16/bf16 conversions only; nothing is linked)."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # nvcc may be a wrapper script: ask it where its toolkit is
            out = subprocess.run(["nvcc", "--dryrun", "--version"], capture_output=True, text=True,
                                 timeout=60).stderr
            m = re.search(r"TOP=(\S+)", out)
            if m:
                candidates.append(m.group(1))
        except (OSError, subprocess.TimeoutExpired):
            pass
    for base in candidates:
        if base and os.path.exists(os.path.join(base, "include", "cuda_bf16.h")):
            return os.path.join(base, "include")
    return None


def _compiler_flags(cxx: str, out_dir: str) -> List[str]:
    """Sanitizer flags this compiler accepts (trap mode needs no runtime library)."""
    probe = os.path.join(out_dir, "probe.cpp")
    with open(probe, "w") as f:
        f.write("int f(int* p) { return p[1]; }\n")
    ok = subprocess.run([cxx, "-c", "-fPIC", probe, "-o", probe + ".o"] + SANITIZE,
                        capture_output=True, timeout=120).returncode == 0
    return SANITIZE if ok else []


def includes(path: str, search: Sequence[str]) -> List[str]:
    """Files that `path` includes with #include "...", transitively (itself first)."""
    seen, todo = [], [path]
    while todo:
        f = todo.pop()
        if f in seen or not os.path.exists(f):
            continue
        seen.append(f)
        with open(f) as fh:
            for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', fh.read(), re.M):
                for d in [os.path.dirname(f)] + list(search):
                    if os.path.exists(os.path.join(d, name)):
                        todo.append(os.path.normpath(os.path.join(d, name)))
                        break
    return seen


@functools.lru_cache(maxsize=None)
def compiler() -> Optional[str]:
    """The C++ compiler: CXX (or g++), unless it links libstdc++ statically into shared
    libraries (see residual_fused/_build_env.py), which breaks a library loaded beside
    torch; then the next g++ that does not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_build_env", os.path.join(ROOT, "residual_fused", "_build_env.py"))
    build_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_env)
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    return None if cxx is None else build_env.pick_cxx(cxx)[0]


def compile_objects(out_dir: str, kernels_dir: str = KERNELS, sanitize: bool = True,
                    only: Optional[Sequence[str]] = None, jobs: Optional[int] = None) -> Dict[str, str]:
    """{source name: object} for the kernel and runtime sources (or `only` those)."""
    cxx = compiler()
    include = cuda_include_dir()
    if cxx is None or include is None:
        raise FileNotFoundError("needs a C++17 compiler and the CUDA headers")
    os.makedirs(out_dir, exist_ok=True)
    flags = [cxx, "-std=c++17", "-O1", "-g", "-fPIC", "-w", "-U_FORTIFY_SOURCE",
             "-DRESIDUAL_FUSED_HOST_EMULATION", "-I", include, "-I", kernels_dir, "-I", EMULATOR]
    if sanitize:
        flags += _compiler_flags(cxx, out_dir)
    sources = [(s, os.path.join(kernels_dir, s), ["-include", os.path.join(EMULATOR, "cuda_emulation.h"),
                                                  "-x", "c++"]) for s in KERNEL_SOURCES]
    sources += [(s, os.path.join(EMULATOR, s), []) for s in RUNTIME_SOURCES]
    sources = [job for job in sources if only is None or job[0] in only]

    def compile_one(job):
        name, src, extra = job
        obj = os.path.join(out_dir, name + ".o")
        proc = subprocess.run(flags + extra + ["-c", src, "-o", obj], capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"building the emulator failed on {src}:\n{proc.stderr[-4000:]}")
        return name, obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        return dict(pool.map(compile_one, sources))


def link(objects: Dict[str, str], lib: str) -> str:
    cxx = compiler()
    # Trap mode needs no sanitizer runtime, so the library loads into any process.
    proc = subprocess.run([cxx, "-shared", "-g", "-o", lib] + list(objects.values()) + ["-ldl"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"linking the emulator failed:\n{proc.stderr[-4000:]}")
    return lib


def build(out_dir: str, kernels_dir: str = KERNELS, sanitize: bool = True) -> str:
    """Compile the emulated kernels into a shared library; returns its path."""
    objects = compile_objects(out_dir, kernels_dir, sanitize)
    return link(objects, os.path.join(out_dir, "residual_fused_emulated.so"))


def static_shared_arrays(lib_path: str) -> Dict[str, List[tuple]]:
    """{kernel symbol: [(array symbol, bytes)]}: the __shared__ arrays of each kernel,
    which the host compiler turned into function-local statics (_ZZ<kernel>E<name>)."""
    nm = subprocess.run(["nm", "-D", "--defined-only", "-S", lib_path], capture_output=True,
                        text=True, timeout=120, check=True).stdout
    table: Dict[str, List[tuple]] = {}
    for line in nm.splitlines():
        parts = line.split()
        if len(parts) != 4 or not parts[3].startswith("_ZZN14residual_fused"):
            continue
        sym, size = parts[3], int(parts[1], 16)
        m = re.match(r"^_ZZ(.*)E(\d+)([A-Za-z_]\w*?)(_\d+|__\d+_)?$", sym)
        if not m or int(m.group(2)) != len(m.group(3)):
            continue
        table.setdefault("_Z" + m.group(1), []).append((sym, size))
    return table


class Guarded:
    """Bytes in emulator memory with inaccessible pages around them, as a tensor."""

    def __init__(self, lib, name: str, nbytes: int, align_mod: int, flush_start: bool):
        self.lib, self.name, self.nbytes = lib, name, max(nbytes, 1)
        self.ptr = lib.emu_alloc(name.encode(), self.nbytes, align_mod, int(flush_start))
        if not self.ptr:
            raise MemoryError(f"emulator: could not map {name}")
        self.raw = torch.frombuffer((ctypes.c_ubyte * self.nbytes).from_address(self.ptr),
                                    dtype=torch.uint8)

    def tensor(self, dtype, shape, strides):
        size = torch.empty((), dtype=dtype).element_size()
        return self.raw[: self.nbytes - self.nbytes % size].view(dtype).as_strided(shape, strides)

    def intact(self) -> bool:
        return bool(self.lib.emu_intact(ctypes.c_void_p(self.ptr)))

    def free(self):
        self.lib.emu_free(ctypes.c_void_p(self.ptr))


class Emulator:
    _devices = itertools.count(100)

    def __init__(self, lib_path: str, kernel_build=None):
        self.path = lib_path
        self.lib = ctypes.CDLL(lib_path)
        i64, i32, dbl, ptr, u64 = (ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p,
                                   ctypes.c_ulonglong)
        L = self.lib
        L.emu_fwd.argtypes = [i64, i32, i32, dbl, ptr, i64, i32, ptr, i64, i32, ptr, i32, ptr, i32,
                              ptr, ptr, i32, ptr]
        L.emu_bwd.argtypes = [i64, i32, i32, i32, ptr, i64, i32, ptr, i64, i32, ptr, i64, i32, ptr,
                              ptr, i32, ptr, i32, ptr, ptr, i32, ptr, ptr, i64]
        L.emu_configure.argtypes = [i32, i32, i32]
        L.emu_set_schedule.argtypes = [i32, u64]
        L.emu_set_resources.argtypes = [ctypes.c_char_p, ctypes.c_char_p, i32, i32, i32]
        L.emu_register_static_shared.argtypes = [ctypes.c_char_p, ptr, ctypes.c_size_t]
        L.emu_inject.argtypes = [i32, i32, i32]
        L.emu_message.restype = ctypes.c_char_p
        L.emu_profile_name.restype = ctypes.c_char_p
        names = tuple(L.emu_profile_name(i).decode() for i in range(L.emu_profile_count()))
        assert names == PROFILES, f"device.cpp has profiles {names}, PROFILES says {PROFILES}"
        L.emu_fault_offset.restype = u64
        L.emu_alloc.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, i32]
        L.emu_alloc.restype = ptr
        L.emu_intact.argtypes = [ptr]
        L.emu_free.argtypes = [ptr]
        L.emu_sweep.argtypes = [i32, i32, i64, i32, i32, ctypes.c_char_p, i32]
        L.emu_plan.argtypes = [i32, i32, i64, i32, i32, ctypes.c_char_p, i32, ctypes.POINTER(i64),
                               ctypes.POINTER(i32), ctypes.POINTER(i64), ctypes.POINTER(i32),
                               ctypes.POINTER(i32)]
        self.static_shared = static_shared_arrays(lib_path)
        for kernel, arrays in self.static_shared.items():
            for sym, size in arrays:
                address = ctypes.addressof(ctypes.c_char.in_dll(L, sym))
                L.emu_register_static_shared(kernel.encode(), address, size)
        self.resources_loaded = False
        if kernel_build is not None:
            for k in kernel_build.kernels.values():
                L.emu_set_resources(k.name.encode(), k.arch.encode(), k.registers, k.static_smem,
                                    k.max_threads or 1024)
            self.resources_loaded = True
        self.flush_start = False
        self.configure()

    # ---- configuration -------------------------------------------------------------
    def configure(self, profile: str = "h100", sm_count: int = 3) -> None:
        """Emulate a fresh GPU of this profile (a new device index, so no attribute or
        opt-in cached by dispatch.cu carries over). ``sm_count`` 0 keeps the profile's;
        few SMs make the persistent kernels loop over many rows."""
        self.lib.emu_configure(next(self._devices), PROFILES.index(profile), sm_count)

    def schedule(self, name: str, seed: int = 1) -> None:
        self.lib.emu_set_schedule(SCHEDULES[name], seed)

    def inject(self, kind: str, after: int = 0, error: int = 1) -> None:
        """Make the `after`-th next call of `kind` fail with cudaError `error`."""
        self.lib.emu_inject(INJECT[kind], after, error)

    def clear_injections(self) -> None:
        for kind in INJECT:
            self.lib.emu_inject(INJECT[kind], -1, 0)

    def sweep(self, lo: int, hi: int, rows: int, aligned: bool, dtype=torch.bfloat16):
        """(failures, description) of the launch-only sweep over hidden sizes lo..hi."""
        out = ctypes.create_string_buffer(4096)
        n = self.lib.emu_sweep(lo, hi, rows, int(aligned), DTYPE_CODE[dtype], out, len(out))
        return n, out.value.decode()

    def plan(self, backward: bool, hidden: int, rows: int, aligned: bool = True, dtype=torch.bfloat16):
        """The main kernel a call launches on the configured device: a dict with its
        symbol, grid, block, dynamic shared memory, CTAs per SM and CTAs per cluster
        (None if refused)."""
        name = ctypes.create_string_buffer(512)
        grid, block, smem, ctas = ctypes.c_int64(), ctypes.c_int(), ctypes.c_int64(), ctypes.c_int()
        cluster = ctypes.c_int()
        status = self.lib.emu_plan(int(backward), hidden, rows, int(aligned), DTYPE_CODE[dtype], name,
                                   len(name), ctypes.byref(grid), ctypes.byref(block), ctypes.byref(smem),
                                   ctypes.byref(ctas), ctypes.byref(cluster))
        if status != 0:
            return None
        return {"kernel": name.value.decode(), "grid": grid.value, "block": block.value,
                "smem": smem.value, "ctas_per_sm": ctas.value, "cluster": cluster.value}

    # ---- failures ------------------------------------------------------------------
    def _where(self) -> str:
        offset = self.lib.emu_fault_offset()
        if not offset or shutil.which("addr2line") is None:
            return ""
        out = subprocess.run(["addr2line", "-e", self.path, "-f", "-C", "-i", "-p", hex(offset)],
                             capture_output=True, text=True, timeout=60).stdout.strip()
        return f"\n  at {out}" if out else ""

    def _fail(self, status: int, what: str):
        message = self.lib.emu_message().decode() or "(no message)"
        raise EmulatorError(f"emulated {what} failed (cudaError {status}): {message}{self._where()}")

    # ---- memory --------------------------------------------------------------------
    def _input(self, allocs, name, t: Optional[torch.Tensor]):
        if t is None:
            return None
        if t.dim() == 1:
            shape, strides, span = (t.numel(),), (1,), t.numel()
        else:
            assert t.dim() == 2 and (t.stride(1) == 1 or t.size(1) == 1), "2-D, last dim contiguous"
            shape, strides = tuple(t.shape), (t.stride(0), 1)
            span = (t.size(0) - 1) * t.stride(0) + t.size(1) if t.numel() else 0
        g = Guarded(self.lib, name, span * t.element_size(), t.data_ptr() % 16, self.flush_start)
        allocs.append(g)
        view = g.tensor(t.dtype, shape, strides)
        view.copy_(t)
        return view

    def _output(self, allocs, name, shape, dtype):
        n = 1
        for s in shape:
            n *= s
        g = Guarded(self.lib, name, n * torch.empty((), dtype=dtype).element_size(), 0, self.flush_start)
        allocs.append(g)
        view = g.tensor(dtype, shape, tuple(torch.empty(shape).stride()))
        view.fill_(float("nan"))
        return view

    def _finish(self, allocs, status, what, outputs):
        try:
            if status != 0:
                self._fail(status, what)
            for g in allocs:
                if not g.intact():
                    raise EmulatorError(f"emulated {what}: a kernel wrote next to {g.name}")
            return tuple(None if o is None else o.clone() for o in outputs)
        finally:
            for g in allocs:
                g.free()

    # ---- the ops ---------------------------------------------------------------------
    def fwd(self, x, residual, weight, bias, eps, is_rms_norm, store_residual_out, residual_out_dtype):
        rows, hidden = x.shape
        stats = torch.float64 if x.dtype == torch.float64 else torch.float32
        a: list = []
        xg = self._input(a, "x", x)
        rg = self._input(a, "residual", residual)
        wg = self._input(a, "weight", weight)
        bg = self._input(a, "bias", bias)
        y = self._output(a, "y", (rows, hidden), x.dtype)
        res = self._output(a, "residual_out", (rows, hidden), residual_out_dtype) if store_residual_out else None
        rstd = self._output(a, "rstd", (rows,), stats)
        status = self.lib.emu_fwd(
            rows, hidden, int(is_rms_norm), eps, _ptr(xg), _row_stride(xg), _code(xg), _ptr(rg),
            _row_stride(rg), _code(rg), _ptr(wg), _code(wg), _ptr(bg), _code(bg), _ptr(y), _ptr(res),
            DTYPE_CODE[residual_out_dtype], _ptr(rstd))
        return self._finish(a, status, "forward", (y, res, rstd))

    def bwd(self, dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm, memory_efficient,
            dresidual_dtype, workspace_delta: int = 0):
        rows, hidden = dy.shape
        a: list = []
        dyg = self._input(a, "dy", dy)
        dog = self._input(a, "dresidual_out", dresidual_out)
        sg = self._input(a, "saved", saved)
        rg = self._input(a, "rstd", rstd)
        wg = self._input(a, "weight", weight)
        bg = self._input(a, "bias", bias)
        dx = self._output(a, "dx", (rows, hidden), dy.dtype)
        dres = None if dresidual_dtype is None else self._output(a, "dresidual", (rows, hidden), dresidual_dtype)
        dw = None if weight is None else self._output(a, "dweight", (hidden,), weight.dtype)
        db = None if bias is None else self._output(a, "dbias", (hidden,), bias.dtype)
        status = self.lib.emu_bwd(
            rows, hidden, int(is_rms_norm), int(memory_efficient), _ptr(dyg), _row_stride(dyg),
            _code(dyg), _ptr(dog), _row_stride(dog), _code(dog), _ptr(sg), _row_stride(sg), _code(sg),
            _ptr(rg), _ptr(wg), _code(wg), _ptr(bg), _code(bg), _ptr(dx), _ptr(dres),
            DTYPE_CODE.get(dresidual_dtype, 0), _ptr(dw), _ptr(db), workspace_delta)
        return self._finish(a, status, "backward", (dx, dres, dw, db))


def _ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _code(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else DTYPE_CODE[t.dtype]


def _row_stride(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or t.dim() < 2 else t.stride(0)

