"""``python -m residual_fused``: what this machine runs, and why.

``python -m residual_fused`` (or ``doctor``) prints the versions, the toolchain,
the GPUs, whether the compiled kernels are loaded (and if not, why and the one
command that fixes it), the first-use build cache and the support matrix for this
torch. ``python -m residual_fused build`` builds the kernels ahead of time into the
first-use cache, so the first op does not wait for the compiler.
"""

import argparse
import os
import platform
import sys

import torch

from . import __version__, _jit, _loader
from .support import (MAX_CPU_HIDDEN_SIZE, MAX_CUDA_HIDDEN_SIZE, TORCH_FLOORS,
                      TRANSFORMERS_RANGES, torch_supports)


def _driver() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    try:
        import ctypes

        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"CUDA driver API {version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        return "loaded (version unknown)"


def _kernel_status(kind: str, cxx, cuda_version, cuda_why) -> str:
    """One line: loaded, or why not and the command that fixes it."""
    if _loader.has_kernel(kind.upper()):
        return "loaded"
    if kind == "cuda" and torch.version.cuda is None:
        return (f"not available: torch {torch.__version__} is a CPU build. Fix: install a "
                f"CUDA build of torch (pip install torch --index-url "
                f"https://download.pytorch.org/whl/cu130), then reinstall residual_fused")
    if kind == "cuda" and cuda_version is None:
        major = torch.version.cuda.split(".")[0]
        return (f"not built: {cuda_why}. Fix: install a CUDA {major}.x toolkit and set "
                f"CUDA_HOME to it, then python -m residual_fused build")
    if cxx is None:
        return ("not built: no C++ compiler was found. Fix: install g++ (or set CXX), "
                "then python -m residual_fused build")
    why = (f"an installed library failed to load ({_loader.load_error})" if _loader.load_error
           else "this installation has no compiled extension")
    if _jit.cached_libraries(cuda_version) and _jit.enabled():
        return f"built in the cache; the first {kind} op loads them ({why})"
    if not _jit.enabled():
        return f"not built: {why}, and RESIDUAL_FUSED_JIT=0. Fix: python -m residual_fused build"
    return (f"not loaded yet: {why}; the first {kind} op builds them (about a minute, once). "
            f"To build now: python -m residual_fused build")


def _cache_summary() -> str:
    root = _jit.cache_root()
    if not os.path.isdir(root):
        return f"{root} (empty)"
    builds = [d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "ok"))]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root)
               for f in files if os.path.isfile(os.path.join(d, f)))
    return f"{root} ({len(builds)} build(s), {size / 2**20:.0f} MiB)"


def doctor(out=sys.stdout) -> None:
    def line(label, value):
        print(f"{label:<22} {value}", file=out)

    line("residual_fused", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})")
    line("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}); "
                  f"Python {platform.python_version()}; {platform.system()} {platform.machine()}")
    cxx, cuda_version, cuda_why = _jit.toolchain()
    line("C++ compiler", cxx or f"none found (CXX={os.environ.get('CXX', 'c++')})")
    if torch.version.cuda is not None:
        line("CUDA toolkit", f"{cuda_version} (matches torch)" if cuda_version else cuda_why)
    line("GPU driver", _driver())
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(i)
        line(f"GPU {i}", f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    line("CPU capability", torch.backends.cpu.get_cpu_capability())
    line("CPU kernels", _kernel_status("cpu", cxx, cuda_version, cuda_why))
    line("CUDA kernels", _kernel_status("cuda", cxx, cuda_version, cuda_why))
    for path in _loader.loaded_libraries:
        kind = ("CUDA, stable ABI" if os.path.basename(path).startswith("_cuda_stable")
                else f"built for torch {torch.__version__}")
        line("loaded library", f"{path} ({kind})")
    line("build on first use", "on" if _jit.enabled() else "off (RESIDUAL_FUSED_JIT=0)")
    if os.environ.get("RESIDUAL_FUSED_VARIANT"):  # a tuning override: every CUDA call runs it or fails
        line("kernel variant", f"{os.environ['RESIDUAL_FUSED_VARIANT']} (RESIDUAL_FUSED_VARIANT, for tuning: "
                               "calls it cannot run fail; unset it to let dispatch choose)")
    line("build cache", _cache_summary())
    root = _jit.source_root()
    if root is not None:
        line("this build's key", _jit.cache_key(root, cuda_version))
    print("\nsupport on this machine:", file=out)
    for feature, (major, minor) in TORCH_FLOORS.items():
        ok = "yes" if torch_supports(feature) else f"no (needs torch >= {major}.{minor})"
        line(f"  {feature}", ok)
    line("  hidden size", f"CPU kernels <= {MAX_CPU_HIDDEN_SIZE}, CUDA kernels <= "
                          f"{MAX_CUDA_HIDDEN_SIZE}, reference: any")
    try:
        import transformers
        found = transformers.__version__
    except ImportError:
        found = "not installed"
    ranges = ", ".join(f"{family} {'.'.join(map(str, low))} to <{'.'.join(map(str, high))}"
                       for family, (low, high) in TRANSFORMERS_RANGES.items())
    line("  transformers", f"{found} (conversions: {ranges})")


def build(out=sys.stdout) -> int:
    try:
        libraries = _jit.build()
    except _jit.BuildError as err:
        print(f"residual_fused: {err}", file=sys.stderr)
        return 1
    print(f"built: {', '.join(libraries)}", file=out)
    if _loader.extension_loaded:
        print("note: the installed extension loads first; this build is used where it "
              "does not (after a torch upgrade, or with no extension installed)", file=out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m residual_fused", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="doctor", choices=["doctor", "build"])
    args = parser.parse_args(argv)
    if args.command == "build":
        return build()
    doctor()
    return 0


if __name__ == "__main__":
    sys.exit(main())
