"""Build-time checks of the C++ toolchain, used by setup.py (no torch import here).

A C++ compiler that links libstdc++ statically into a shared library (a wrapper
adding ``-static-libstdc++``, as some CUDA images install first on PATH) builds an
extension that imports fine but carries a second copy of the C++ runtime beside
the one torch uses. The first error message the extension formats then crashes
the process (seen on an H200 machine: a bad argument segfaulted inside
``std::ostream::operator<<(double)`` instead of raising). setup.py asks
:func:`pick_cxx` for a compiler that links the runtime dynamically.
"""

import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterable, List, Optional, Tuple

_PROBE = """
#include <sstream>
#include <string>
std::string residual_fused_probe(double v) { std::ostringstream s; s << v; return s.str(); }
"""
# std::ostream::_M_insert<double>: defined in the probe library only when libstdc++
# was copied into it.
_STATIC_MARKER = "_ZNSo9_M_insertIdEERSoT_"


def links_cxx_runtime_statically(cxx: str) -> Optional[bool]:
    """True if ``cxx -shared`` copies libstdc++ into the library, False if not,
    None if that cannot be told here (the compiler or ``nm`` fails or is missing)."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write(_PROBE)
        try:
            built = subprocess.run([cxx, "-shared", "-fPIC", "-O1", src, "-o", lib],
                                   capture_output=True, timeout=120)
            if built.returncode != 0:
                return None
            symbols = subprocess.run([nm, "--defined-only", lib], capture_output=True,
                                     text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if symbols.returncode != 0:
            return None
        return _STATIC_MARKER in symbols.stdout


def _candidates(current: str, path: str) -> List[str]:
    """Other C++ compilers than ``current``: g++/c++ from each PATH entry, then /usr/bin."""
    seen = {os.path.realpath(shutil.which(current) or current)}
    found = []
    dirs = [d for d in path.split(os.pathsep) if d] + ["/usr/bin"]
    for d in dirs:
        for name in ("g++", "c++"):
            exe = os.path.join(d, name)
            real = os.path.realpath(exe)
            if os.access(exe, os.X_OK) and real not in seen:
                seen.add(real)
                found.append(exe)
    return found


def pick_cxx(current: str, path: Optional[str] = None,
             probe=links_cxx_runtime_statically) -> Tuple[str, Optional[str]]:
    """(compiler to build with, message for the log or None).

    Keeps ``current`` unless it links libstdc++ statically; then the first other
    g++/c++ on PATH (or /usr/bin) that does not. Raises RuntimeError if every
    compiler found does, since such an extension would crash on its first error.
    """
    if probe(current) is not True:
        return current, None
    rejected: Iterable[str] = [current]
    for other in _candidates(current, os.environ.get("PATH", "") if path is None else path):
        verdict = probe(other)
        if verdict is False:
            return other, (f"the C++ compiler {current!r} links libstdc++ statically into "
                           f"shared libraries, which breaks error handling beside torch; "
                           f"building with {other!r} instead (set CXX to choose another)")
        rejected = [*rejected, other]
    raise RuntimeError(
        f"every C++ compiler found ({', '.join(rejected)}) links libstdc++ statically into "
        "shared libraries; an extension built that way crashes on its first error. Set CXX "
        "to a g++ or clang++ that links it dynamically (the default for both).")


def compiler_accepts(cxx: str, flags: List[str]) -> bool:
    """True if ``cxx`` compiles and links a shared library with ``flags`` (for
    example ``-fopenmp``, which some compilers lack)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write("int residual_fused_probe() { return 0; }\n")
        try:
            built = subprocess.run([cxx, "-shared", "-fPIC", *flags, src, "-o", lib],
                                   capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return built.returncode == 0


# Headers the CUDA build needs from the toolkit itself (pip's nvidia-* wheels ship
# cuda_runtime.h without crt/, so a CUDA_HOME that holds only those fails late).
CUDA_HEADERS = ("cuda_runtime.h", "crt/host_defines.h")


def _nvcc_dryrun_top(nvcc: str) -> Optional[str]:
    """The toolkit folder an ``nvcc`` really runs from: nvcc's dry run prints it as
    ``TOP=``, whatever wrapper script or symlink stands in front of it on PATH."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            run = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "p.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
    for line in (run.stdout + run.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.normpath(line[len("#$ TOP="):].strip().strip('"'))
    return None


def find_cuda_home(environ=None, which=shutil.which) -> Tuple[Optional[str], str]:
    """(CUDA toolkit folder or None, where it came from).

    ``CUDA_HOME`` or ``CUDA_PATH`` when set; else the toolkit the ``nvcc`` on PATH
    belongs to, asked of nvcc itself (torch takes the folder above PATH's nvcc,
    which is wrong for a wrapper script such as /usr/local/bin/nvcc); else
    /usr/local/cuda if it has an nvcc.
    """
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            return environ[var], var
    nvcc = which("nvcc")
    if nvcc is not None:
        top = _nvcc_dryrun_top(nvcc)
        if top is None:
            top = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        return top, f"the toolkit of {nvcc}"
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no CUDA_HOME, CUDA_PATH or nvcc on PATH"


def nvcc_version(nvcc: str) -> Optional[str]:
    """``"13.0"`` from ``nvcc --version``, or None if it cannot be run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else None


def missing_cuda_headers(home: str) -> List[str]:
    """The CUDA_HEADERS not found under ``home``/include (or targets/*/include)."""
    roots = [os.path.join(home, "include")]
    targets = os.path.join(home, "targets")
    if os.path.isdir(targets):
        roots += [os.path.join(targets, t, "include") for t in sorted(os.listdir(targets))]
    return [h for h in CUDA_HEADERS
            if not any(os.path.exists(os.path.join(r, h)) for r in roots)]


def cuda_mismatch(toolkit: str, torch_cuda: str, where: str = "",
                  torch_version: str = "") -> Optional[str]:
    """Why a CUDA ``toolkit`` version cannot build for a torch built with
    ``torch_cuda``, or None: their major versions must match (torch's rule).
    ``where`` (the toolkit's folder) and ``torch_version`` go into the message."""
    if toolkit.split(".")[0] != torch_cuda.split(".")[0]:
        torch_name = f"torch {torch_version}" if torch_version else "torch"
        return (f"the CUDA toolkit{where} is {toolkit}, while {torch_name} was built with "
                f"CUDA {torch_cuda}; their major versions must match")
    return None


def cuda_toolkit(torch_cuda: str, torch_version: str, environ=None,
                 which=shutil.which) -> Tuple[Optional[str], Optional[str], str]:
    """(folder, version, "") of the CUDA toolkit that can build for a torch built with
    CUDA ``torch_cuda``, or (None, None, why not, in one sentence naming the folder,
    where it came from and both versions). setup.py and the first-use build both
    decide with this."""
    home, source = find_cuda_home(environ, which)
    if home is None:
        return None, None, f"no CUDA toolkit was found ({source}; set CUDA_HOME)"
    nvcc = os.path.join(home, "bin", "nvcc")
    version = nvcc_version(nvcc)
    if version is None:
        return None, None, f"{nvcc} (CUDA_HOME from {source}) does not run"
    where = f" at {home} (from {source})"
    mismatch = cuda_mismatch(version, torch_cuda, where, torch_version)
    if mismatch:
        return None, None, mismatch
    missing = missing_cuda_headers(home)
    if missing:
        return None, None, (f"the CUDA toolkit{where} lacks {', '.join(missing)}; set CUDA_HOME "
                            f"to a complete toolkit")
    return home, version, ""
