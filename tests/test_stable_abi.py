"""The CUDA ops' glue against LibTorch's stable ABI (csrc/stable/).

Everywhere torch has the stable headers (>= 2.10) and the CUDA headers exist, the glue
must compile with TORCH_STABLE_ONLY and leave no symbol to resolve in torch's C++
API: only the versioned C shim (aoti_torch_*, torch_*), which is what lets one
binary load under every later torch. Where the library was built (a CUDA torch), it
must load and dispatch (tests/stable_abi_check.py; run that script with another
torch's Python to check a second version).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import residual_fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_INCLUDE = os.path.join(os.path.dirname(torch.__file__), "include")


def _cuda_include():
    for home in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        from residual_fused import _build_env

        home, _ = _build_env.find_cuda_home({})
        if home and not _build_env.missing_cuda_headers(home):
            return os.path.join(home, "include")
    return None


@pytest.mark.skipif(not os.path.exists(os.path.join(TORCH_INCLUDE, "torch", "csrc", "stable",
                                                    "library.h")),
                    reason=f"torch {torch.__version__} has no stable ABI headers (>= 2.10)")
def test_stable_glue_needs_only_the_c_shim(tmp_path):
    cuda = _cuda_include()
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cuda is None or cxx is None or shutil.which("nm") is None:
        pytest.skip("needs a C++ compiler, nm and the CUDA headers")
    obj = tmp_path / "glue.o"
    built = subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", "-c", "-I", TORCH_INCLUDE,
                            "-I", os.path.join(ROOT, "csrc"), "-I", cuda,
                            os.path.join(ROOT, "csrc", "stable", "add_norm_cuda.cpp"),
                            "-o", str(obj)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    undefined = subprocess.run(["nm", "-u", "-C", str(obj)], capture_output=True, text=True,
                               check=True).stdout.split("\n")
    torch_cpp = [s for s in undefined if re.search(r"\b(c10|at|torch)::", s)]
    assert not torch_cpp, f"symbols of torch's C++ API (not the stable ABI): {torch_cpp[:10]}"
    shim = [s.split()[-1] for s in undefined if re.search(r"\b(aoti_torch_|torch_)", s)]
    assert "torch_library_impl" in shim and "aoti_torch_get_current_cuda_stream" in shim


def _stable_libraries():
    package = os.path.dirname(residual_fused.__file__)
    return glob.glob(os.path.join(package, "_cuda_stable*.so"))


@pytest.mark.skipif(not _stable_libraries() or torch.version.cuda is None,
                    reason="no stable-ABI CUDA library built here (needs a CUDA torch >= 2.10)")
def test_stable_library_loads_and_dispatches():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "stable_abi_check.py"),
                             _stable_libraries()[0]], capture_output=True, text=True,
                            env={**os.environ, "RESIDUAL_FUSED_JIT": "0"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "add_norm_bwd reached the CUDA kernel" in result.stdout


@pytest.mark.slow  # 14 s: torch's full headers
def test_aten_cuda_glue_compiles(tmp_path):
    """The ATen CUDA glue (torch < 2.10, or RESIDUAL_FUSED_STABLE_ABI=0) shares
    glue_impl.h with the stable one; it must keep compiling where no CUDA torch is
    installed to build it whole (a syntax check against this torch's headers)."""
    cuda = _cuda_include()
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cuda is None or cxx is None:
        pytest.skip("needs a C++ compiler and the CUDA headers")
    if not os.path.exists(os.path.join(TORCH_INCLUDE, "c10", "cuda", "CUDAGuard.h")):
        pytest.skip(f"torch {torch.__version__} ships no c10/cuda headers")
    # CPU wheels ship c10/cuda without the header CMake generates; it only sets macros.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("")
    built = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-I", TORCH_INCLUDE,
                            "-I", os.path.join(TORCH_INCLUDE, "torch", "csrc", "api", "include"),
                            "-idirafter", str(tmp_path), "-I", os.path.join(ROOT, "csrc"),
                            "-I", cuda, os.path.join(ROOT, "csrc", "cuda", "add_norm_cuda.cpp")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
