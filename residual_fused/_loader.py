"""The compiled libraries: find the installed ones, check and load them, or build them
on first use.

- ``_C`` (the CPU kernels, the C++ autograd, the plain-function entries; the CUDA
  kernels too in builds against torch's full C++ API) is imported as a module, and only
  under the torch it was built for (``built_for``).
- ``_cuda_stable`` (the CUDA kernels against the stable ABI) is a plain library.
- Where neither covers a device, the first op on it builds them (``_jit``) and loads
  the result (``build_on_first_use``); else the reference runs, and ``notice_reference``
  says so once.

The ops' schemas and kernels live in ``ops``, which calls this module; nothing here
imports ``ops``.
"""

import glob
import importlib
import importlib.util
import json
import os
import warnings
from typing import Callable, List, Optional

import torch

from . import _jit

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

load_error: Optional[str] = None  # why an installed library did not load, if one did not
loaded_libraries: List[str] = []  # paths of the compiled libraries loaded, installed or built on first use
extension_loaded = False  # whether any compiled library is loaded


def _loaded_or_warn(load, name: str) -> bool:
    global load_error
    try:
        load()
        return True
    except (ImportError, OSError, RuntimeError) as err:  # built for another torch or CUDA
        load_error = f"{name}: {err}"
        warnings.warn(
            f"residual_fused: the compiled {name} failed to load ({err}), as after a "
            f"torch upgrade; the first op builds the kernels again where it can (see "
            f"python -m residual_fused), else uses the slower PyTorch reference. "
            f"To rebuild now: pip install --no-build-isolation .",
            stacklevel=5,
        )
        return False


def built_for(library: str) -> Optional[str]:
    """The torch version a _C library was built against (setup.py writes it beside
    the library as _C.build.json), or None if that file is missing."""
    try:
        with open(os.path.join(os.path.dirname(library), "_C.build.json")) as f:
            return json.load(f).get("torch")
    except (OSError, ValueError):
        return None


def import_c(path: str):
    """``residual_fused._C`` (at ``path``), imported. _C links torch's C++ API: under
    another torch it may import without an error and register its kernels under the
    wrong dispatch keys, so it is imported only under the torch it was built for."""
    built = built_for(path)
    if built != torch.__version__:
        raise ImportError(f"it was built for torch {built or '(unknown)'}, and this is torch "
                          f"{torch.__version__}")
    return importlib.import_module(f"{__package__}._C")


def load_installed():
    """Load the compiled libraries that were installed: ``_C`` is imported,
    ``_cuda_stable`` loaded as a library. Returns the ``_C`` module, or None where it
    is absent or did not load."""
    global extension_loaded
    c_module = None
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is not None:
        imported = []
        if _loaded_or_warn(lambda: imported.append(import_c(spec.origin)), "extension _C"):
            c_module = imported[0]
            loaded_libraries.append(spec.origin)
    if torch.version.cuda is not None:  # a CPU-only torch has no use for CUDA kernels
        for path in glob.glob(os.path.join(_PACKAGE_DIR, "_cuda_stable*.so")):
            if _loaded_or_warn(lambda: torch.ops.load_library(path),
                               f"CUDA library {os.path.basename(path)}"):
                loaded_libraries.append(path)
    extension_loaded = bool(loaded_libraries)
    return c_module


def has_kernel(dispatch_key: str) -> bool:
    return extension_loaded and torch._C._dispatch_has_kernel_for_dispatch_key(
        "residual_fused::add_norm_fwd", dispatch_key)


def cuda_kernels_available() -> bool:
    """True when the compiled CUDA kernels are loaded (CUDA tensors use them)."""
    return has_kernel("CUDA")


def cpu_kernels_available() -> bool:
    """True when the compiled CPU kernels are loaded (CPU tensors use them; else the
    PyTorch reference runs on CPU)."""
    return has_kernel("CPU")


_noticed_devices = set()


def notice_reference(device: torch.device) -> None:
    """Say once per device type (CPU, CUDA) that the reference runs there because no
    compiled kernels for it were built or loaded."""
    kind = device.type
    if kind in _noticed_devices or kind not in ("cpu", "cuda"):
        return
    _noticed_devices.add(kind)
    if not has_kernel(kind.upper()):
        warnings.warn(
            f"residual_fused: no compiled {kind.upper()} kernels are loaded, so {kind} "
            f"tensors use the slower PyTorch reference; python -m residual_fused says why "
            f"and what to install",
            stacklevel=4,
        )


_jit_tried = set()


def build_on_first_use(device: torch.device, before_cpu_library: Callable[[], None] = lambda: None) -> bool:
    """Build and load the kernels for ``device``'s type if none are loaded and this
    machine can build them (once per process); True if they are loaded now.
    ``before_cpu_library`` runs before a library with the CPU kernels loads (it brings
    the C++ autograd, which replaces the Python one)."""
    global extension_loaded
    kind = device.type
    if kind in _jit_tried or kind not in ("cpu", "cuda") or not _jit.enabled():
        return False
    _jit_tried.add(kind)
    if has_kernel(kind.upper()):
        return False
    cxx, cuda_version, _ = _jit.toolchain()
    if cxx is None or (kind == "cuda" and cuda_version is None):
        return False  # the notice that follows says what to install
    try:
        # Where the CPU kernels are loaded (a CPU-only _C installed under a CUDA torch),
        # only the CUDA kernels are built: registering kernels twice is an error.
        for library in _jit.build(with_cuda=not has_kernel("CUDA"), cuda_only=has_kernel("CPU")):
            covers = "CUDA" if os.path.basename(library).startswith(("_cuda_stable", "_cuda_aten")) else "CPU"
            if covers == "CPU" and built_for(library) != torch.__version__:
                raise _jit.BuildError(f"{library} was not built for torch {torch.__version__}")
            if not has_kernel(covers):
                if covers == "CPU":
                    before_cpu_library()
                torch.ops.load_library(library)
                loaded_libraries.append(library)
    except (_jit.BuildError, OSError, RuntimeError) as err:
        warnings.warn(f"residual_fused: {err}", stacklevel=5)
        return False
    extension_loaded = True
    return has_kernel(kind.upper())
