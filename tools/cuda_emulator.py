"""Run the CUDA kernels of csrc/kernels on the CPU, through tools/emulator.

The kernel sources, their launch plans and dispatch.cu are compiled unchanged by the
host C++ compiler with tools/emulator/cuda_emulation.h (threads as fibers under a
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
import dataclasses
import functools
import itertools
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
KERNELS = os.path.join(ROOT, "csrc", "kernels")
EMULATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulator")
KERNEL_SOURCES = ["fwd_rows.cu", "fwd_streamed.cu", "bwd_rows.cu", "bwd_streamed.cu", "cluster_rows.cu",
                  "variant.cu", "dispatch.cu"]
RUNTIME_SOURCES = ["scheduler.cpp", "device.cpp", "memory.cpp", "checker.cpp", "api.cpp"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
SCHEDULES = {"round_robin": 0, "reverse": 1, "random": 2, "warp_greedy": 3, "cta_greedy": 4}
PROFILES = ("h100", "a100", "sm86")
INJECT = {"set_attribute": 0, "occupancy": 1, "func_attributes": 2, "launch": 3, "device_properties": 4}
SANITIZE = ["-fsanitize=undefined", "-fno-sanitize=vptr", "-fsanitize-undefined-trap-on-error"]
# Every load and store of the kernel sources calls __asan_load<N>/__asan_store<N>, which
# tools/emulator/checker.cpp implements (no AddressSanitizer runtime): GCC's and
# Clang's spellings of call-mode instrumentation without stack or global redzones.
ACCESS_HOOKS = {
    "gcc": ["-fsanitize=address", "-fsanitize-recover=address",
            "--param", "asan-instrumentation-with-call-threshold=0", "--param", "asan-stack=0",
            "--param", "asan-globals=0", "--param", "asan-use-after-return=0",
            "--param", "asan-instrument-allocas=0"],
    "clang": ["-fsanitize=address", "-fsanitize-recover=address",
              "-mllvm", "-asan-instrumentation-with-call-threshold=0", "-mllvm", "-asan-stack=0",
              "-mllvm", "-asan-globals=0", "-mllvm", "-asan-use-after-return=never"],
}


class BuildError(RuntimeError):
    """A source of the emulator did not compile; ``stderr`` is the compiler's whole output."""

    def __init__(self, message: str, stderr: str):
        super().__init__(message)
        self.stderr = stderr


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


def _accepts(cxx: str, out_dir: str, flags: List[str]) -> bool:
    probe = os.path.join(out_dir, "probe.cpp")
    with open(probe, "w") as f:
        f.write("int f(int* p) { return p[1]; }\n")
    return subprocess.run([cxx, "-c", "-fPIC", probe, "-o", probe + ".o"] + flags,
                          capture_output=True, timeout=120).returncode == 0


def _compiler_flags(cxx: str, out_dir: str) -> List[str]:
    """Sanitizer flags this compiler accepts (trap mode needs no runtime library)."""
    return SANITIZE if _accepts(cxx, out_dir, SANITIZE) else []


def access_hook_flags(cxx: str, out_dir: str) -> List[str]:
    """The flags that route every access of the kernels through checker.cpp; without
    them the emulator would silently check far less, so their absence is an error."""
    for flags in ACCESS_HOOKS.values():
        if _accepts(cxx, out_dir, flags):
            return flags
    raise FileNotFoundError(f"{cxx} has no call-mode AddressSanitizer instrumentation "
                            f"(GCC >= 8 or Clang >= 7), which the emulator's access checks need")


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
                    only: Optional[Sequence[str]] = None, jobs: Optional[int] = None,
                    coverage: bool = False, debug: bool = True) -> Dict[str, str]:
    """{source name: object} for the kernel and runtime sources (or `only` those).
    ``coverage``: the kernel sources also count line and branch executions (gcov).
    ``debug`` False: no debug information (40% faster to compile; fault reports then
    name no source line)."""
    cxx = compiler()
    include = cuda_include_dir()
    if cxx is None or include is None:
        raise FileNotFoundError("needs a C++17 compiler and the CUDA headers")
    os.makedirs(out_dir, exist_ok=True)
    # -O1: fast enough to run large cases; a coverage build is unoptimised, so gcov
    # attributes every count to its own source line.
    flags = [cxx, "-std=c++17", "-O0" if coverage else "-O1"] + (["-g"] if debug else []) + [
        "-fPIC", "-w", "-U_FORTIFY_SOURCE", "-DRESIDUAL_FUSED_HOST_EMULATION", "-I", include, "-I", kernels_dir,
        "-I", EMULATOR]
    if sanitize:
        flags += _compiler_flags(cxx, out_dir)
    kernel_flags = ["-include", os.path.join(EMULATOR, "cuda_emulation.h"), "-x", "c++"]
    kernel_flags += access_hook_flags(cxx, out_dir)
    runtime_flags = []
    if coverage:
        kernel_flags += ["--coverage"]
        runtime_flags += ["-DRESIDUAL_FUSED_EMULATOR_COVERAGE"]
    sources = [(s, os.path.join(kernels_dir, s), kernel_flags) for s in KERNEL_SOURCES]
    sources += [(s, os.path.join(EMULATOR, s), runtime_flags) for s in RUNTIME_SOURCES]
    sources = [job for job in sources if only is None or job[0] in only]

    def compile_one(job):
        name, src, extra = job
        obj = os.path.join(out_dir, name + ".o")
        proc = subprocess.run(flags + extra + ["-c", src, "-o", obj], capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode != 0:
            raise BuildError(f"building the emulator failed on {src}:\n{proc.stderr[-4000:]}", proc.stderr)
        return name, obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        return dict(pool.map(compile_one, sources))


def link(objects: Dict[str, str], lib: str, coverage: bool = False) -> str:
    cxx = compiler()
    # Trap mode needs no sanitizer runtime, so the library loads into any process.
    proc = subprocess.run([cxx, "-shared", "-g", "-o", lib] + list(objects.values()) + ["-ldl"]
                          + (["--coverage"] if coverage else []),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"linking the emulator failed:\n{proc.stderr[-4000:]}")
    return lib


def build(out_dir: str, kernels_dir: str = KERNELS, sanitize: bool = True, coverage: bool = False) -> str:
    """Compile the emulated kernels into a shared library; returns its path."""
    objects = compile_objects(out_dir, kernels_dir, sanitize, coverage=coverage)
    return link(objects, os.path.join(out_dir, "residual_fused_emulated.so"), coverage)


CACHE_DIR = os.path.join(ROOT, "build", "emulator")


def build_key(coverage: bool = False) -> str:
    """A hash of everything a build depends on: the kernel and emulator sources, this
    file's flags, the compiler."""
    import hashlib

    h = hashlib.sha256()
    for d in (KERNELS, EMULATOR):
        for name in sorted(os.listdir(d)):
            h.update(name.encode())
            with open(os.path.join(d, name), "rb") as f:
                h.update(f.read())
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout if cxx else ""
    h.update((version + str(coverage)).encode())
    return h.hexdigest()[:16]


def build_cached(coverage: bool = False) -> str:
    """The emulator library for today's sources, built once per checkout under
    build/emulator/ (``coverage``: the gcov-instrumented variant, in its own folder,
    where gcov also writes its counts). Concurrent callers build it once."""
    import fcntl

    if compiler() is None or cuda_include_dir() is None:
        raise FileNotFoundError("needs a C++17 compiler and the CUDA headers")
    out = os.path.join(CACHE_DIR, ("coverage-" if coverage else "checked-") + build_key(coverage))
    lib = os.path.join(out, "residual_fused_emulated.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(lib):
            objects = compile_objects(out, coverage=coverage)
            link(objects, lib + ".tmp", coverage)
            os.replace(lib + ".tmp", lib)  # appears whole, or not at all
    return lib


def make_emulator(kernel_build) -> "Emulator":
    """An emulator whose launches obey the resources nvcc reported in `kernel_build`
    (tools/cubin.py), for the plans of the real dispatch code (bench/sass_audit.py,
    bench/model_facts.py). Its library is its own (not build_cached()'s), rebuilt only
    when the kernel or emulator sources change."""
    import glob
    import hashlib

    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(KERNELS, "*")) + glob.glob(os.path.join(EMULATOR, "*"))):
        with open(path, "rb") as f:
            h.update(f.read())
    out = os.path.join(CACHE_DIR, h.hexdigest()[:16])
    lib = os.path.join(out, "residual_fused_emulated.so")
    if not os.path.exists(lib):
        build(out)
    return Emulator(lib, kernel_build)


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

    KINDS = {"input": 0, "output": 1, "inplace": 4}

    def __init__(self, lib, name: str, nbytes: int, align_mod: int, flush_start: bool,
                 kind: str = "input"):
        self.lib, self.name, self.nbytes = lib, name, max(nbytes, 1)
        self.ptr = lib.emu_alloc(name.encode(), self.nbytes, align_mod, int(flush_start),
                                 self.KINDS[kind])
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


KMAX_DEVICES = 64  # kMaxDevices of csrc/kernels/dispatch.cu: devices with cached attributes


class Emulator:
    # Device indices: the first 64 use dispatch.cu's per-device attribute caches, later
    # ones the uncached path it takes for indices past its table; every configure is a
    # fresh index, so nothing cached for one emulated GPU is seen by another.
    _devices = itertools.count(0)

    def __init__(self, lib_path: str, kernel_build=None):
        self.path = lib_path
        self.lib = ctypes.CDLL(lib_path)
        i64, i32, dbl, ptr, u64 = (ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p,
                                   ctypes.c_ulonglong)
        L = self.lib
        L.emu_params_layout.argtypes = [i32, i32, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(i32),
                                        ctypes.POINTER(i32), ctypes.POINTER(ctypes.c_size_t)]
        self.fwd_params = ParamsLayout(L, backward=False)
        self.bwd_params = ParamsLayout(L, backward=True)
        L.emu_fwd.argtypes = [ptr, ctypes.c_size_t]
        L.emu_bwd.argtypes = [ptr, ctypes.c_size_t, i64]
        L.emu_configure.argtypes = [i32, i32, i32, i32, i32]
        L.emu_recorded_launch.argtypes = [i32, ctypes.c_char_p, i32, ctypes.POINTER(i64), ctypes.POINTER(i32),
                                          ctypes.POINTER(i32)]
        L.emu_plan_boundaries.argtypes = [i32, i64, i32, i32, i32, i32, i32, ctypes.POINTER(i32), i32]
        L.emu_set_dry_run.argtypes = [i32]
        L.emu_set_device_name.argtypes = [ctypes.c_char_p]
        L.residual_fused_last_refusal.restype = ctypes.c_char_p
        L.emu_clear_recorded.argtypes = []
        L.emu_set_schedule.argtypes = [i32, u64]
        L.emu_set_resources.argtypes = [ctypes.c_char_p, ctypes.c_char_p, i32, i32, i32]
        L.emu_register_static_shared.argtypes = [ctypes.c_char_p, ptr, ctypes.c_size_t]
        L.emu_inject.argtypes = [i32, i32, i32]
        L.emu_message.restype = ctypes.c_char_p
        L.emu_profile_name.restype = ctypes.c_char_p
        names = tuple(L.emu_profile_name(i).decode() for i in range(L.emu_profile_count()))
        assert names == PROFILES, f"device.cpp has profiles {names}, PROFILES says {PROFILES}"
        L.emu_fault_offset.restype = u64
        L.emu_alloc.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, i32, i32]
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
    def configure(self, profile: str = "h100", sm_count: int = 3, clusters: bool = True,
                  device: Optional[int] = None, code_arch: int = 0) -> None:
        """Emulate a fresh GPU of this profile (a new device index, so no attribute or
        opt-in cached by dispatch.cu carries over). ``sm_count`` 0 keeps the profile's;
        few SMs make the persistent kernels loop over many rows. ``clusters`` False: an
        sm_90 part that refuses thread-block clusters. ``device``: this index instead
        (only those past dispatch.cu's caches, >= KMAX_DEVICES, may be used twice).
        ``code_arch``: the PTX target the kernels' code was built for, if not the
        profile's own (80 on an H100: a build for compute_80 run through the JIT)."""
        if device is None:
            device = next(self._devices)
        else:
            assert device >= KMAX_DEVICES, f"device {device} is in dispatch.cu's caches: only fresh indices"
        self.lib.emu_configure(device, PROFILES.index(profile), sm_count, int(clusters), code_arch)

    def set_device_name(self, name: str) -> None:
        """The configured GPU reports this name (the measured table is keyed by it)
        until the next configure."""
        self.lib.emu_set_device_name(name.encode())

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
        refusal = self.lib.residual_fused_last_refusal()
        message = (self.lib.emu_message().decode() or (refusal.decode() if refusal else "")
                   or "(no message)")
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
        # The bytes the tensor spans, as they are: rows may overlap (a row stride below
        # the width) or repeat (stride 0), and padding between rows stays as it is.
        g.tensor(t.dtype, (span,), (1,)).copy_(torch.as_strided(t, (span,), (1,)))
        return g.tensor(t.dtype, shape, strides)

    def _output(self, allocs, name, shape, dtype, offset: int = 0):
        """A NaN-filled output in guarded memory whose address is `offset` bytes past a
        16-byte boundary (the kernels must check every pointer they vectorise)."""
        n = 1
        for s in shape:
            n *= s
        g = Guarded(self.lib, name, n * torch.empty((), dtype=dtype).element_size(), offset, self.flush_start,
                    "output")
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
    def fwd(self, x, residual, weight, bias, eps, is_rms_norm, store_residual_out, residual_out_dtype,
            out_offsets: Optional[Dict[str, int]] = None, weight_offset: float = 0.0, store_mean: bool = False):
        """torch.ops.residual_fused.add_norm_fwd through the emulated kernels. Inputs keep
        their row stride and their address mod 16; ``out_offsets`` places the outputs
        (y, residual_out, rstd, mean) that many bytes past a 16-byte boundary. Returns
        (y, residual_out, rstd, mean), None for those the call does not produce."""
        rows, hidden = x.shape
        stats = torch.float64 if x.dtype == torch.float64 else torch.float32
        off = out_offsets or {}
        a: list = []
        xg = self._input(a, "x", x)
        rg = self._input(a, "residual", residual)
        wg = self._input(a, "weight", weight)
        bg = self._input(a, "bias", bias)
        y = self._output(a, "y", (rows, hidden), x.dtype, off.get("y", 0))
        res = (self._output(a, "residual_out", (rows, hidden), residual_out_dtype, off.get("residual_out", 0))
               if store_residual_out else None)
        rstd = self._output(a, "rstd", (rows,), stats, off.get("rstd", 0))
        mean = self._output(a, "mean", (rows,), stats, off.get("mean", 0)) if store_mean else None
        status = self._fwd_call(_fwd_scalars(rows, hidden, is_rms_norm, eps, weight_offset),
                                _args(x=xg, residual=rg, weight=wg, bias=bg, y=y, residual_out=res, rstd=rstd,
                                      mean=mean))
        return self._finish(a, status, "forward", (y, res, rstd, mean))

    def fwd_inplace(self, x, residual, weight, bias, eps, is_rms_norm, weight_offset: float = 0.0):
        """torch.ops.residual_fused.add_norm_fwd_inplace through the emulated kernels: x
        and residual (contiguous [rows, hidden]) sit in memory the kernels may overwrite
        but must read before they do (emulator kind "inplace"); y is written over x and
        x + residual over residual. Returns (x, residual, rstd) after the call."""
        rows, hidden = x.shape
        assert x.is_contiguous() and residual.is_contiguous(), "in place: contiguous rows"
        stats = torch.float64 if x.dtype == torch.float64 else torch.float32
        a: list = []
        regions = []
        for name, t in (("x", x), ("residual", residual)):
            g = Guarded(self.lib, name, t.numel() * t.element_size(), t.data_ptr() % 16, self.flush_start,
                        "inplace")
            a.append(g)
            view = g.tensor(t.dtype, tuple(t.shape), tuple(t.stride()))
            view.copy_(t)
            regions.append(view)
        xg, rg = regions
        wg = self._input(a, "weight", weight)
        bg = self._input(a, "bias", bias)
        rstd = self._output(a, "rstd", (rows,), stats)
        status = self._fwd_call(_fwd_scalars(rows, hidden, is_rms_norm, eps, weight_offset),
                                _args(x=xg, residual=rg, weight=wg, bias=bg, y=xg, residual_out=rg, rstd=rstd,
                                      mean=None))
        return self._finish(a, status, "in-place forward", (xg, rg, rstd))

    def bwd(self, dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm, memory_efficient,
            dresidual_dtype, workspace_delta: int = 0, out_offsets: Optional[Dict[str, int]] = None,
            weight_offset: float = 0.0, mean=None):
        """torch.ops.residual_fused.add_norm_bwd through the emulated kernels (``out_offsets``
        as in fwd, for dx, dresidual, dweight, dbias; ``mean`` the forward's, or None)."""
        rows, hidden = dy.shape
        off = out_offsets or {}
        a: list = []
        dyg = self._input(a, "dy", dy)
        dog = self._input(a, "dresidual_out", dresidual_out)
        sg = self._input(a, "saved", saved)
        rg = self._input(a, "rstd", rstd)
        wg = self._input(a, "weight", weight)
        bg = self._input(a, "bias", bias)
        mg = self._input(a, "mean", mean)
        dx = self._output(a, "dx", (rows, hidden), dy.dtype, off.get("dx", 0))
        dres = (None if dresidual_dtype is None
                else self._output(a, "dresidual", (rows, hidden), dresidual_dtype, off.get("dresidual", 0)))
        dw = None if weight is None else self._output(a, "dweight", (hidden,), weight.dtype, off.get("dweight", 0))
        db = None if bias is None else self._output(a, "dbias", (hidden,), bias.dtype, off.get("dbias", 0))
        status = self._bwd_call(_bwd_scalars(rows, hidden, is_rms_norm, memory_efficient, weight_offset),
                                _args(dy=dyg, dresidual_out=dog, saved=sg, rstd=rg, weight=wg, bias=bg, dx=dx,
                                      dresidual=dres, dweight=dw, dbias=db, mean=mg),
                                workspace_delta)
        return self._finish(a, status, "backward", (dx, dres, dw, db))

    def _fwd_call(self, scalars: dict, tensors: dict) -> int:
        params = self.fwd_params.fill(scalars, tensors)
        return self.lib.emu_fwd(ctypes.byref(params), ctypes.sizeof(params))

    def _bwd_call(self, scalars: dict, tensors: dict, workspace_delta: int) -> int:
        # The workspace is emu_bwd's to allocate, from the plan.
        params = self.bwd_params.fill(dict(scalars, partial_rows=0),
                                      dict(tensors, dweight_partial=None, dbias_partial=None))
        return self.lib.emu_bwd(ctypes.byref(params), ctypes.sizeof(params), workspace_delta)

    # ---- plans of real calls, not run ----------------------------------------------------
    def _planned(self, call) -> List[dict]:
        self.lib.emu_clear_recorded()
        self.lib.emu_set_dry_run(1)
        try:
            status = call()
        finally:
            self.lib.emu_set_dry_run(0)
            self.lib.emu_take_last_error()
        if status != 0:
            message = self.lib.emu_message().decode()
            raise EmulatorError(f"planning failed (cudaError {status}): {message}")
        name = ctypes.create_string_buffer(512)
        grid, block, cluster = ctypes.c_int64(), ctypes.c_int(), ctypes.c_int()
        out, k, n = [], 0, 1
        while k < n:
            n = self.lib.emu_recorded_launch(k, name, len(name), ctypes.byref(grid), ctypes.byref(block),
                                             ctypes.byref(cluster))
            if k < n:
                out.append({"kernel": name.value.decode(), "grid": grid.value, "block": block.value,
                            "cluster": cluster.value})
            k += 1
        self.lib.emu_clear_recorded()
        return out

    def plan_fwd(self, rows, hidden, specs: Dict[str, Optional["TensorSpec"]], is_rms_norm) -> List[dict]:
        """The launches a forward with tensors like ``specs`` (x, residual, weight, bias,
        y, residual_out, rstd, mean: dtype, address mod 16 and row stride; absent if
        None or not given) makes on the configured device, planned by the real launch
        code and not run."""
        tensors = self.fwd_params.fake_tensors(specs)
        return self._planned(lambda: self._fwd_call(_fwd_scalars(rows, hidden, is_rms_norm, 1e-5, 0.0), tensors))

    def plan_bwd(self, rows, hidden, specs: Dict[str, Optional["TensorSpec"]], is_rms_norm,
                 memory_efficient) -> List[dict]:
        """plan_fwd for the backward (dy, dresidual_out, saved, rstd, weight, bias, dx,
        dresidual, dweight, dbias, mean)."""
        tensors = self.bwd_params.fake_tensors(specs)
        return self._planned(lambda: self._bwd_call(_bwd_scalars(rows, hidden, is_rms_norm, memory_efficient, 0.0),
                                                    tensors, 0))

    def plan_boundaries(self, backward: bool, rows: int, lo: int, hi: int, step: int, aligned: bool,
                        dtype=torch.bfloat16) -> List[int]:
        """Hidden sizes in lo..hi (every step-th) where the main kernel's plan changes."""
        cap = 4096
        out = (ctypes.c_int * cap)()
        n = self.lib.emu_plan_boundaries(int(backward), rows, lo, hi, step, int(aligned), DTYPE_CODE[dtype],
                                         out, cap)
        return list(out[: min(n, cap)])


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor as a plan sees it: dtype, address mod 16 (bytes), row stride (elements)."""
    dtype: torch.dtype
    offset: int = 0
    row_stride: int = 0


_FAKE_BASE = 1 << 40  # never dereferenced: plans only


def _fake(spec: Optional[TensorSpec]):
    if spec is None:
        return None
    return (_FAKE_BASE + spec.offset, spec.row_stride, DTYPE_CODE[spec.dtype])


def _args(**tensors: Optional[torch.Tensor]) -> Dict[str, Optional[tuple]]:
    """(address, row stride, dtype code) of each tensor, None for those absent."""
    return {name: None if t is None else (t.data_ptr(), t.stride(0) if t.dim() == 2 else 0, DTYPE_CODE[t.dtype])
            for name, t in tensors.items()}


def _fwd_scalars(rows, hidden, is_rms_norm, eps, weight_offset) -> dict:
    return {"rows": rows, "hidden": hidden, "is_rms_norm": bool(is_rms_norm), "eps": float(eps),
            "weight_offset": float(weight_offset)}


def _bwd_scalars(rows, hidden, is_rms_norm, memory_efficient, weight_offset) -> dict:
    return {"rows": rows, "hidden": hidden, "is_rms_norm": bool(is_rms_norm),
            "memory_efficient": bool(memory_efficient), "weight_offset": float(weight_offset)}


# emu_params_layout's field types (csrc/kernels/params.h: FieldType).
FIELD_TYPES = (ctypes.c_int64, ctypes.c_int32, ctypes.c_bool, ctypes.c_double, ctypes.c_void_p, ctypes.c_int8)


class ParamsLayout:
    """One params struct of csrc/kernels/params.h as the compiled library lays it out
    (emu_params_layout): a ctypes structure with every field at the kernels' offset,
    filled by name. A tensor is a pointer field with its companions `<name>_row_stride`
    and `<name>_dtype` where it has them; every other field is a scalar. :meth:`fill`
    refuses a call that leaves a field unnamed or names one the struct lacks, so a
    field added to the struct's list stops every call that does not give it."""

    def __init__(self, lib, backward: bool):
        self.what = "AddNormBwdParams" if backward else "AddNormFwdParams"
        name, kind, offset, size = ctypes.c_char_p(), ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
        fields = []
        for i in range(lib.emu_params_layout(int(backward), -1, None, None, None, ctypes.byref(size))):
            lib.emu_params_layout(int(backward), i, ctypes.byref(name), ctypes.byref(kind), ctypes.byref(offset),
                                  ctypes.byref(size))
            fields.append((name.value.decode(), FIELD_TYPES[kind.value], offset.value))
        self.size = size.value
        cfields, at = [], 0
        for k, (n, ctype, off) in enumerate(sorted(fields, key=lambda f: f[2])):
            if off < at:
                raise EmulatorError(f"{self.what}: field {n} at byte {off} overlaps the one before it")
            if off > at:
                cfields.append((f"_pad{k}", ctypes.c_ubyte * (off - at)))
            cfields.append((n, ctype))
            at = off + ctypes.sizeof(ctype)
        if self.size > at:
            cfields.append(("_pad_end", ctypes.c_ubyte * (self.size - at)))
        self.struct = type(self.what, (ctypes.Structure,), {"_fields_": cfields})
        wrong = [n for n, _, off in fields if getattr(self.struct, n).offset != off]
        if wrong or ctypes.sizeof(self.struct) != self.size:
            raise EmulatorError(f"{self.what}: ctypes cannot lay out the library's fields {wrong} "
                                f"({ctypes.sizeof(self.struct)} bytes for {self.size})")
        names = {n for n, _, _ in fields}
        self.tensors = [n for n, ctype, _ in fields if ctype is ctypes.c_void_p]
        companions = {f"{t}{suffix}" for t in self.tensors for suffix in ("_row_stride", "_dtype")}
        self.scalars = [n for n in names if n not in companions and n not in self.tensors]
        self.row_strided = {t for t in self.tensors if f"{t}_row_stride" in names}
        self.typed = {t for t in self.tensors if f"{t}_dtype" in names}

    def fill(self, scalars: Dict[str, object], tensors: Dict[str, Optional[tuple]]):
        """The struct of one call: every scalar field from ``scalars``, every tensor
        from ``tensors`` ((address, row stride, dtype code), or None if absent)."""
        missing = [n for n in self.scalars if n not in scalars] + [n for n in self.tensors if n not in tensors]
        unknown = [n for n in scalars if n not in self.scalars] + [n for n in tensors if n not in self.tensors]
        if missing or unknown:
            raise EmulatorError(f"{self.what} (csrc/kernels/params.h) has fields this call does not give "
                                f"{missing} and lacks fields it gives {unknown}")
        p = self.struct()
        for n in self.scalars:
            setattr(p, n, scalars[n])
        for n in self.tensors:
            ptr, row_stride, code = tensors[n] or (None, 0, 0)
            setattr(p, n, ptr)
            if n in self.row_strided:
                setattr(p, f"{n}_row_stride", row_stride)
            if n in self.typed:
                setattr(p, f"{n}_dtype", code)
        return p

    def fake_tensors(self, specs: Dict[str, Optional["TensorSpec"]]) -> Dict[str, Optional[tuple]]:
        """Every tensor of a planned call: those of ``specs`` at fake addresses, the rest
        absent; a name the struct lacks is refused."""
        unknown = [n for n in specs if n not in self.tensors]
        if unknown:
            raise EmulatorError(f"{self.what} (csrc/kernels/params.h) has no tensors {unknown}")
        return {n: _fake(specs.get(n)) for n in self.tensors}

