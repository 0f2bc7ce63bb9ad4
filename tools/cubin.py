"""Compile csrc/kernels with nvcc and read what the compiled code says about itself.

For every kernel and architecture: registers, static shared memory, stack frame and
spills (ptxas -v), the ``__launch_bounds__`` thread limit (EIATTR_MAX_THREADS), and
with ``cuobjdump`` the SASS with its 128-bit encodings (read by sass.py). One
compile per source serves the build test, the SASS audit and the emulator's launch
rules; results are cached under build/kernel-audit/ by a hash of the sources, the
flags and the nvcc version, so a second use in the same checkout costs nothing.

    python tools/cubin.py            # print the resource table
"""

import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
KERNEL_DIR = os.path.join(ROOT, "csrc", "kernels")
SOURCES = ("fwd_rows.cu", "fwd_streamed.cu", "bwd_rows.cu", "bwd_streamed.cu", "cluster_rows.cu")
ARCHS = ("80", "90")
FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xptxas=-v"]
CACHE_DIR = os.path.join(ROOT, "build", "kernel-audit")


@dataclasses.dataclass
class Kernel:
    """One kernel compiled for one architecture."""

    name: str          # mangled, as in SASS and dladdr()
    arch: str          # "80", "90"
    source: str        # fwd_rows.cu, ...
    registers: int
    static_smem: int   # bytes declared __shared__ (without the 1 KB the driver reserves)
    stack: int
    spill_stores: int
    spill_loads: int
    max_threads: Optional[int] = None  # __launch_bounds__ limit (needs cuobjdump)


def find_tool(name: str) -> Optional[str]:
    """A CUDA binary from PATH, CUDA_HOME, next to nvcc, or pip's nvidia-* wheels."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(os.path.dirname(os.path.realpath(nvcc)))
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "bin"))
        dirs += glob.glob(os.path.join(base, "nvidia", "cuda_*", "bin"))
    for d in dirs:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return None


def _nvcc_version() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else "unknown"


def _key(archs) -> str:
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(KERNEL_DIR, "*"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join(FLAGS + list(archs)).encode())
    h.update(_nvcc_version().encode())
    return h.hexdigest()[:16]


_ARCH = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(stderr: str, source: str) -> Dict[Tuple[str, str], Kernel]:
    """Kernels from the ``ptxas -v`` report of one compile."""
    kernels, current = {}, None
    for line in stderr.splitlines():
        if m := _ARCH.search(line):
            current = Kernel(m.group(1), m.group(2), source, 0, 0, 0, 0, 0)
            kernels[(current.name, current.arch)] = current
        elif current is not None and (m := _FRAME.search(line)):
            current.stack, current.spill_stores, current.spill_loads = (int(g) for g in m.groups())
        elif current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            current.static_smem = int(m.group(2) or 0)
    return kernels


def parse_max_threads(elf_dump: str) -> Dict[str, int]:
    """{kernel: launch-bounds thread limit} from ``cuobjdump -elf`` of one cubin."""
    limits, current, attr = {}, None, None
    for line in elf_dump.splitlines():
        if line.startswith(".nv.info."):
            current = line[len(".nv.info."):].strip()
        elif "Attribute:" in line:
            attr = line.split("Attribute:")[1].strip()
        elif attr == "EIATTR_MAX_THREADS" and "Value:" in line and current:
            x, y, z = (int(v, 16) for v in line.split("Value:")[1].split()[:3])
            limits[current] = x * y * z
            attr = None
    return limits


def split_by_arch(dump: str) -> Dict[str, str]:
    """cuobjdump output of a multi-architecture object, one text per sm_XX."""
    parts, arch, buf = {}, None, []
    for line in dump.splitlines():
        m = re.search(r"code for sm_(\d+)|^arch = sm_(\d+)", line)
        if m:
            if arch is not None:
                parts[arch] = "\n".join(buf)
            arch, buf = m.group(1) or m.group(2), []
        buf.append(line)
    if arch is not None:
        parts[arch] = "\n".join(buf)
    return parts


@dataclasses.dataclass
class Build:
    """Everything one compile of the kernel sources gives."""

    kernels: Dict[Tuple[str, str], Kernel]
    sass: Dict[Tuple[str, str], str]  # (source, arch) -> cuobjdump -sass text ({} without cuobjdump
                                      # and nvdisasm)
    directory: str

    def kernel(self, name: str, arch: str) -> Kernel:
        return self.kernels[(name, arch)]

    def names(self, arch: str) -> List[str]:
        return sorted(n for (n, a) in self.kernels if a == arch)


def _compile_one(source: str, out_dir: str, archs) -> Tuple[str, str]:
    obj = os.path.join(out_dir, source + ".o")
    cmd = ["nvcc"] + FLAGS + ["-c", os.path.join(KERNEL_DIR, source), "-o", obj]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{proc.stderr[-4000:]}")
    return obj, proc.stderr


def build(archs=ARCHS, cache_dir: str = CACHE_DIR, jobs: Optional[int] = None) -> Build:
    """Compile (or load from the cache) every kernel source for ``archs``."""
    if shutil.which("nvcc") is None:
        raise FileNotFoundError("nvcc is not on PATH")
    out_dir = os.path.join(cache_dir, _key(archs))
    manifest = os.path.join(out_dir, "kernels.json")
    if not os.path.exists(manifest):
        os.makedirs(out_dir, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
            results = list(pool.map(lambda s: _compile_one(s, out_dir, archs), SOURCES))
        kernels = {}
        for source, (obj, report) in zip(SOURCES, results):
            kernels.update(parse_ptxas(report, source))
        cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
        # cuobjdump -sass runs nvdisasm, which pip's wheels put in their own folder.
        env = dict(os.environ)
        if nvdisasm:
            env["NVDISASM_PATH"] = os.path.dirname(nvdisasm)
            env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
        kinds = ("sass", "elf") if nvdisasm else ("elf",)
        if cuobjdump:
            for source in SOURCES:
                obj = os.path.join(out_dir, source + ".o")
                for kind in kinds:
                    proc = subprocess.run([cuobjdump, f"-{kind}", obj], capture_output=True,
                                          text=True, timeout=600, env=env)
                    if proc.returncode != 0:
                        raise RuntimeError(f"cuobjdump -{kind} failed on {obj}:\n{proc.stderr[-2000:]}")
                    dump = proc.stdout
                    for arch, text in split_by_arch(dump).items():
                        with open(os.path.join(out_dir, f"{source}.sm_{arch}.{kind}"), "w") as f:
                            f.write(text)
                        if kind == "elf":
                            for name, limit in parse_max_threads(text).items():
                                if (name, arch) in kernels:
                                    kernels[(name, arch)].max_threads = limit
        tmp = manifest + ".tmp"
        with open(tmp, "w") as f:
            json.dump([dataclasses.asdict(k) for k in kernels.values()], f, indent=1)
        os.replace(tmp, manifest)  # the cache entry exists only once complete
    with open(manifest) as f:
        kernels = {(k["name"], k["arch"]): Kernel(**k) for k in json.load(f)}
    sass = {}
    for source in SOURCES:
        for arch in archs:
            path = os.path.join(out_dir, f"{source}.sm_{arch}.sass")
            if os.path.exists(path):
                with open(path) as f:
                    sass[(source, arch)] = f.read()
    return Build(kernels, sass, out_dir)


def main() -> None:
    b = build()
    print(f"{'kernel':100} {'sm':>3} {'regs':>4} {'smem':>6} {'stack':>5} {'spill':>5} {'maxthr':>6}")
    for (name, arch), k in sorted(b.kernels.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{name[:100]:100} {arch:>3} {k.registers:4} {k.static_smem:6} {k.stack:5} "
              f"{k.spill_stores + k.spill_loads:5} {k.max_threads or '?':>6}")
    print(f"cached in {b.directory}; SASS for {len(b.sass)} (source, arch) pairs")


if __name__ == "__main__":
    main()
