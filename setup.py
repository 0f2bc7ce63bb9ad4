"""Build residual_fused: always the Python package; the CUDA extension when possible.

The extension ``residual_fused._C`` is compiled only when the torch visible to the
build has CUDA and an ``nvcc`` is found. That torch must be the one you run with,
so CUDA builds need ``pip install --no-build-isolation``: with build isolation pip
builds in a fresh environment without your torch, and the result is the
pure-Python package. ``RESIDUAL_FUSED_BUILD_CUDA=1`` makes a missing prerequisite
an error; ``RESIDUAL_FUSED_BUILD_CUDA=0`` skips the extension.
"""

import glob
import importlib.util
import os
import shutil
import site
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_CUDA = os.environ.get("RESIDUAL_FUSED_BUILD_CUDA", "auto").lower()


def _log(msg):
    print(f"residual_fused setup: {msg}", file=sys.stderr)


def _skip(reason):
    if BUILD_CUDA in ("1", "true", "yes"):
        raise RuntimeError(f"RESIDUAL_FUSED_BUILD_CUDA=1 but {reason}")
    _log(f"building the pure-Python package only ({reason})")
    return {}


def _nvidia_wheel_dirs():
    """Include/lib folders of pip's nvidia-* wheels (CUDA torch wheels bring them),
    so the build works without a full toolkit's headers under CUDA_HOME."""
    includes, libs = [], []
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        for base in glob.glob(os.path.join(root, "nvidia", "*")):
            if os.path.isdir(os.path.join(base, "include")):
                includes.append(os.path.join(base, "include"))
            if os.path.isdir(os.path.join(base, "lib")):
                libs.append(os.path.join(base, "lib"))
    return includes, libs


def _use_safe_cxx():
    """Build with a C++ compiler that links libstdc++ dynamically (residual_fused/_build_env.py).
    Returns why no such compiler was found, or None."""
    spec = importlib.util.spec_from_file_location(
        "_build_env", os.path.join(HERE, "residual_fused", "_build_env.py"))
    build_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_env)
    current = os.environ.get("CXX", "c++")  # what torch's build helper would use
    try:
        cxx, message = build_env.pick_cxx(current)
    except RuntimeError as err:
        return str(err)
    if message:
        _log(message)
        os.environ["CXX"] = cxx
    return None


def _cuda_extension_kwargs():
    if BUILD_CUDA in ("0", "false", "no"):
        return _skip("RESIDUAL_FUSED_BUILD_CUDA=0")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _skip("torch is not importable here; use pip install --no-build-isolation")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} has no CUDA")
    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return _skip("nvcc was not found (set CUDA_HOME)")

    bad_cxx = _use_safe_cxx()
    if bad_cxx:
        return _skip(bad_cxx)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # With no GPU to detect, torch would build for every architecture its CUDA
        # knows; the kernels target sm_80 and newer (PTX covers later GPUs).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    includes, libs = _nvidia_wheel_dirs()
    # The wheels' headers (cusparse.h and others torch's CUDA headers include) are
    # searched after the toolkit's, so a wheel's partial set (a cuda_runtime_api.h
    # without crt/) never shadows the toolkit nvcc belongs to; only the C++ glue needs
    # them (the kernels include no torch headers).
    after = [flag for d in includes for flag in ("-idirafter", d)]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/kernels/*.cu"))
    nvcc_flags = [
        # No -std: torch's build helper picks the standard its headers need (C++17 for
        # older torch, C++20 for newer); the kernels need C++17 or later.
        "-O3", "-lineinfo", "--expt-relaxed-constexpr",
        # Torch adds -D__CUDA_NO_HALF_OPERATORS__ and friends; the kernels include no
        # torch headers and use the cuda_fp16/cuda_bf16 operators directly.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    if os.environ.get("RESIDUAL_FUSED_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    extension = cpp_extension.CUDAExtension(
        name="residual_fused._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        library_dirs=libs,
        extra_compile_args={"cxx": ["-O3"] + after, "nvcc": nvcc_flags},
    )
    _log(f"building the CUDA extension from {len(sources)} sources "
         f"(TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')})")
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


setup(**_cuda_extension_kwargs())
