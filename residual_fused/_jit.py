"""Build on first use: compile the kernels where the installed package has none.

A package installed without its compiled kernels (an isolated ``pip install``, a
CUDA toolkit that appeared later, an extension left behind by a torch upgrade)
builds them the first time an op runs on a device they would cover, with the same
``setup.py`` as an install, and loads the result. Builds are cached under a key made
of everything the binary depends on: torch's version (torch's own JIT cache key
omits it, so an upgrade would load a stale binary), torch's CUDA and the toolkit's,
the GPU architectures, the Python version, the machine, and a hash of the sources.

``RESIDUAL_FUSED_JIT=0`` turns this off (the PyTorch reference runs instead);
``RESIDUAL_FUSED_CACHE`` moves the cache (default ``~/.cache/residual_fused``);
``python -m residual_fused build`` builds ahead of time.
"""

import glob
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import List, Optional, Tuple

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_NO = ("0", "false", "no", "off")


def _build_env():
    # Loaded by path, as setup.py does, so this module and setup.py share one copy.
    spec = importlib.util.spec_from_file_location(
        "residual_fused_build_env", os.path.join(_PACKAGE, "_build_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def enabled() -> bool:
    return os.environ.get("RESIDUAL_FUSED_JIT", "1").lower() not in _NO


def source_root() -> Optional[str]:
    """The folder holding setup.py and csrc/: shipped inside an installed wheel as
    ``residual_fused/_source``, or the repository an editable install points at."""
    for root in (os.path.join(_PACKAGE, "_source"), os.path.dirname(_PACKAGE)):
        if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(
                os.path.join(root, "csrc")):
            return root
    return None


def _source_files(root: str) -> List[str]:
    files = [os.path.join(root, "setup.py"),
             os.path.join(root, "residual_fused", "_build_env.py")]
    for ext in ("cpp", "h", "cu", "cuh"):
        files += glob.glob(os.path.join(root, "csrc", "**", f"*.{ext}"), recursive=True)
    return sorted(f for f in files if os.path.isfile(f))


def cache_root() -> str:
    return os.environ.get("RESIDUAL_FUSED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "residual_fused")


def toolchain() -> Tuple[Optional[str], Optional[str], str]:
    """(C++ compiler or None, CUDA toolkit version that can build for this torch or
    None, why there is no such toolkit)."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if torch.version.cuda is None:
        return cxx, None, f"torch {torch.__version__} has no CUDA"
    if os.environ.get("RESIDUAL_FUSED_BUILD_CUDA", "auto").lower() in _NO:
        return cxx, None, "RESIDUAL_FUSED_BUILD_CUDA=0"
    _, version, why = _build_env().cuda_toolkit(torch.version.cuda, torch.__version__)
    return cxx, version, why


def _arch_list() -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():  # what torch's build helper targets: the GPUs present
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return "8.0;9.0+PTX"  # setup.py's default without a GPU


def cache_key(root: str, cuda_version: Optional[str], cuda_only: bool = False) -> str:
    """A readable prefix (torch, CUDA, Python) and a hash of everything else."""
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    cuda = f"cu{cuda_version}-{_arch_list()}" if cuda_version else "cpu"
    for part in (torch.__version__, str(torch.version.cuda), cuda, sys.version,
                 platform.machine(), os.environ.get("CXX", "c++"), "cuda-only" if cuda_only else "all"):
        digest.update(part.encode() + b"\0")
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    tag = (f"cu{cuda_version}" if cuda_version else "cpu") + ("-cudaonly" if cuda_only else "")
    return f"torch{torch.__version__.replace('+', '_')}-{tag}-{python}-{digest.hexdigest()[:16]}"


def _libraries(folder: str) -> List[str]:
    """The libraries of a finished build in ``folder``: _C, and _cuda_stable where the
    CUDA kernels were built against the stable ABI (or _cuda_aten, the CUDA kernels
    alone against torch's C++ API)."""
    if not os.path.exists(os.path.join(folder, "ok")):
        return []
    return sorted(glob.glob(os.path.join(folder, "residual_fused", "_C*.so"))
                  + glob.glob(os.path.join(folder, "residual_fused", "_cuda_stable*.so"))
                  + glob.glob(os.path.join(folder, "residual_fused", "_cuda_aten*.so")))


def _log(msg: str) -> None:
    print(f"residual_fused: {msg}", file=sys.stderr, flush=True)


def cached_libraries(cuda_version: Optional[str]) -> List[str]:
    """The libraries a first-use build left for this configuration, if any."""
    root = source_root()
    return [] if root is None else _libraries(os.path.join(cache_root(),
                                                           cache_key(root, cuda_version)))


class BuildError(RuntimeError):
    pass


def build(quiet: bool = False, with_cuda: bool = True, cuda_only: bool = False) -> List[str]:
    """Build (or find in the cache) the kernels for this torch and toolchain; returns
    the libraries' paths. ``with_cuda=False`` builds the CPU kernels alone (where the
    stable-ABI CUDA library still loads after a torch upgrade); ``cuda_only`` the CUDA
    kernels alone (where the CPU kernels are loaded already: a CPU-only _C installed
    under a CUDA torch). Raises BuildError with the log's tail if the build fails."""
    root = source_root()
    if root is None:
        raise BuildError("the kernels' sources are not part of this installation; "
                         "reinstall with pip install --no-build-isolation .")
    cxx, cuda_version, _ = toolchain()
    cuda_version = cuda_version if with_cuda else None
    cuda_only = cuda_only and cuda_version is not None
    if cxx is None:
        raise BuildError(f"no C++ compiler was found (CXX={os.environ.get('CXX', 'c++')})")
    folder = os.path.join(cache_root(), cache_key(root, cuda_version, cuda_only))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lock"), "w") as lock:
        _lock(lock)  # concurrent processes (DDP ranks) build once, the others wait
        libraries = _libraries(folder)
        if libraries:
            return libraries
        what = (f"CUDA {cuda_version} kernels" if cuda_only else
                f"CPU and CUDA {cuda_version} kernels" if cuda_version else "CPU kernels")
        if not quiet:
            _log(f"building the {what} for torch {torch.__version__} into {folder} "
                 f"(once; about a minute; RESIDUAL_FUSED_JIT=0 turns this off)")
        start = time.perf_counter()
        env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)),
               "RESIDUAL_FUSED_BUILD_EXT": "1",
               "RESIDUAL_FUSED_BUILD_CUDA": "1" if cuda_version else "0",
               "RESIDUAL_FUSED_BUILD_PARTS": "cuda" if cuda_only else "all"}
        log_path = os.path.join(folder, "build.log")
        with open(log_path, "w") as log:
            result = subprocess.run(
                [sys.executable, "setup.py", "build_ext", "--build-lib", folder,
                 "--build-temp", os.path.join(folder, "build")],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode == 0:
            open(os.path.join(folder, "ok"), "w").close()
        libraries = _libraries(folder)
        if not libraries:
            with open(log_path) as log:
                tail = "".join(log.readlines()[-15:])
            raise BuildError(f"building the {what} failed (log: {log_path}):\n{tail}")
        if not quiet:
            _log(f"built the {what} in {time.perf_counter() - start:.0f} s")
        return libraries


def _lock(handle) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no lock; a concurrent build may repeat the work
        return
    fcntl.flock(handle, fcntl.LOCK_EX)
