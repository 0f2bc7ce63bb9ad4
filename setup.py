"""Build residual_fused: always the Python package; the compiled kernels when possible.

The extension ``residual_fused._C`` holds the CPU kernels, built whenever torch is
importable and a C++ compiler is found; the CUDA kernels are added when that torch
has CUDA and a toolkit of the same CUDA major version is found. It must be built
against the torch you run with, so use ``pip install --no-build-isolation``: with
build isolation pip builds in a fresh environment without your torch, and the
result is the pure-Python package (the PyTorch reference on every device).

``RESIDUAL_FUSED_BUILD_EXT=0`` skips the extension (``=1`` makes a missing
prerequisite an error); ``RESIDUAL_FUSED_BUILD_CUDA=0`` skips only the CUDA kernels
(``=1`` makes a missing CUDA prerequisite, such as a toolkit whose CUDA major differs
from torch's, an error). With torch >= 2.10 the CUDA ops go into their own library
built against LibTorch's stable ABI (``RESIDUAL_FUSED_STABLE_ABI=0``: into _C
instead). The wheel also carries these build files, so an installed package without
kernels builds them on first use (residual_fused/_jit.py).
"""

import concurrent.futures
import glob
import importlib.util
import os
import platform
import shutil
import site
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_EXT = os.environ.get("RESIDUAL_FUSED_BUILD_EXT", "auto").lower()
BUILD_CUDA = os.environ.get("RESIDUAL_FUSED_BUILD_CUDA", "auto").lower()
# "cuda": the CUDA kernels alone, for a process whose CPU kernels are already loaded (the
# first-use build where an installed _C has CPU kernels only; residual_fused/_jit.py).
BUILD_PARTS = os.environ.get("RESIDUAL_FUSED_BUILD_PARTS", "all").lower()
_YES, _NO = ("1", "true", "yes"), ("0", "false", "no")


def _log(msg):
    print(f"residual_fused setup: {msg}", file=sys.stderr)


def _skip(reason):
    if BUILD_EXT in _YES or BUILD_CUDA in _YES:
        raise RuntimeError(f"the extension was required (RESIDUAL_FUSED_BUILD_*=1) but {reason}")
    _log(f"building the pure-Python package only ({reason}); "
         f"every op runs the PyTorch reference")
    return {}


def _build_env():
    """residual_fused/_build_env.py, loaded without importing the package (and torch)."""
    spec = importlib.util.spec_from_file_location(
        "_build_env", os.path.join(HERE, "residual_fused", "_build_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def _pick_cxx(build_env):
    """The C++ compiler to build with (also set as CXX), or (None, why not).

    One that links libstdc++ dynamically (see residual_fused/_build_env.py)."""
    current = os.environ.get("CXX", "c++")  # what torch's build helper would use
    if shutil.which(current) is None:
        return None, f"no C++ compiler was found (CXX={current})"
    try:
        cxx, message = build_env.pick_cxx(current)
    except RuntimeError as err:
        return None, str(err)
    if message:
        _log(message)
        os.environ["CXX"] = cxx
    return cxx, None


def _cpu_kernels(build_env, cxx):
    """(sources, flags for every C++ file, extra flags per source, link flags) of the
    CPU kernels.

    csrc/cpu/add_norm_kernel.h is compiled once per CPU capability, each file with its
    own instruction-set flags, and the extension picks one at run time as ATen does,
    so a binary built here runs on any CPU of its architecture.
    """
    sources, defines, flags = ["csrc/cpu/kernel_default.cpp"], [], {}
    if platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32":
        sources.append("csrc/cpu/kernel_avx2.cpp")
        flags["csrc/cpu/kernel_avx2.cpp"] = ["-mavx2", "-mfma", "-mf16c"]
        defines.append("-DRESIDUAL_FUSED_CPU_AVX2")
    # at::parallel_for is OpenMP in torch's Linux builds, inlined into the caller:
    # without -fopenmp it runs on one thread. Linking it reuses the libgomp torch loads.
    openmp = ["-fopenmp"] if build_env.compiler_accepts(cxx, ["-fopenmp"]) else []
    if not openmp:
        _log(f"{cxx} does not accept -fopenmp: the CPU kernels will run on one thread")
    return sources, defines + openmp, flags, openmp


def _grouped_build_ext(base, per_source_flags):
    """``base`` (torch's BuildExtension) compiling each source in ``per_source_flags``
    with those extra flags, since setuptools has one flag set per extension. Each such
    source builds in its own folder, beside and at the same time as the others."""

    def rel(source):
        return os.path.relpath(os.path.abspath(source), HERE).replace(os.sep, "/")

    def with_flags(extra_postargs, extra):
        if isinstance(extra_postargs, dict):  # torch's {"cxx": [...], "nvcc": [...]}
            return {**extra_postargs, "cxx": list(extra_postargs.get("cxx", [])) + extra}
        return list(extra_postargs or []) + extra

    class BuildExt(base):
        def build_extension(self, ext):
            compile_all = self.compiler.compile

            def compile_grouped(sources, output_dir=None, extra_postargs=None, **kwargs):
                flagged = [s for s in sources if rel(s) in per_source_flags]
                plain = [s for s in sources if s not in flagged]
                with concurrent.futures.ThreadPoolExecutor(max_workers=1 + len(flagged)) as pool:
                    jobs = [pool.submit(compile_all, plain, output_dir=output_dir,
                                        extra_postargs=extra_postargs, **kwargs)]
                    for i, source in enumerate(flagged):
                        folder = os.path.join(output_dir or ".", f"flags{i}")
                        jobs.append(pool.submit(
                            compile_all, [source], output_dir=folder,
                            extra_postargs=with_flags(extra_postargs, per_source_flags[rel(source)]),
                            **kwargs))
                    return [obj for job in jobs for obj in job.result()]

            self.compiler.compile = compile_grouped
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_all

        def run(self):
            super().run()
            # _C links torch's C++ API, which changes between releases without a
            # loader error: a _C of another torch can import and register its kernels
            # under the wrong dispatch keys. The package reads this file and imports
            # _C only under the torch it names.
            import json

            import torch

            for ext in self.extensions:
                if ext.name == "residual_fused._C":
                    target = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)),
                                          "_C.build.json")
                    with open(target, "w") as f:
                        json.dump({"torch": torch.__version__}, f)

    return BuildExt


def _cuda_reason_to_skip(torch, build_env):
    """Why the CUDA kernels are not built here, or None if they are. Sets CUDA_HOME
    for torch's build helper (it reads it once, on import) to the toolkit nvcc really
    belongs to."""
    if BUILD_CUDA in _NO:
        return "RESIDUAL_FUSED_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    home, _, why = build_env.cuda_toolkit(torch.version.cuda, torch.__version__)
    if home is not None and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    return why or None


def _stable_abi(torch):
    """Whether the CUDA ops are built against LibTorch's stable ABI (torch >= 2.10):
    one library, residual_fused/_cuda_stable*.abi3.so, that every later torch loads.
    RESIDUAL_FUSED_STABLE_ABI=0 builds them into _C against torch's full C++ API
    instead, as on older torch; =1 makes a torch without the stable ABI an error."""
    choice = os.environ.get("RESIDUAL_FUSED_STABLE_ABI", "auto").lower()
    if choice in _NO:
        return False
    header = os.path.join(os.path.dirname(torch.__file__), "include", "torch", "csrc", "stable",
                          "library.h")
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    available = (major, minor) >= (2, 10) and os.path.exists(header)
    if choice in _YES and not available:
        raise RuntimeError(f"RESIDUAL_FUSED_STABLE_ABI=1 but torch {torch.__version__} has no "
                           f"stable ABI for extensions (torch >= 2.10 has)")
    return available


def _cpu_extension(cpp_extension, sources, cxx_flags, link_flags):
    return cpp_extension.CppExtension(
        name="residual_fused._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


def _cuda_extensions(torch, cpp_extension, sources, cxx_flags, link_flags):
    """The extensions of a CUDA build: with the stable ABI, _C (CPU) and _cuda_stable
    (CUDA, any torch >= 2.10); without it, one _C holding both."""
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
    kernels = sorted(glob.glob("csrc/kernels/*.cu"))
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
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "<torch default>")
    if _stable_abi(torch):
        _log(f"building the CPU kernels against torch {torch.__version__}, and the CUDA kernels "
             f"against its stable ABI (loadable by torch >= 2.10; TORCH_CUDA_ARCH_LIST={arch})")
        cuda = cpp_extension.CUDAExtension(
            name="residual_fused._cuda_stable",
            sources=sorted(glob.glob("csrc/stable/*.cpp")) + kernels,
            include_dirs=[os.path.join(HERE, "csrc")],
            library_dirs=libs,
            extra_compile_args={"cxx": ["-O3"] + after, "nvcc": nvcc_flags},
            # Loaded with torch.ops.load_library, never imported: no Python API is
            # used, so the abi3 name fits every Python version.
            py_limited_api=True,
        )
        if BUILD_PARTS == "cuda":
            return [cuda]
        return [_cpu_extension(cpp_extension, sources, cxx_flags, link_flags), cuda]
    if BUILD_PARTS == "cuda":  # the CUDA glue and kernels, loaded beside a CPU-only _C
        _log(f"building the CUDA kernels alone against torch {torch.__version__} "
             f"(TORCH_CUDA_ARCH_LIST={arch})")
        return [cpp_extension.CUDAExtension(
            name="residual_fused._cuda_aten",
            sources=["csrc/glue.cpp"] + sorted(glob.glob("csrc/cuda/*.cpp")) + kernels,
            include_dirs=[os.path.join(HERE, "csrc")],
            library_dirs=libs,
            extra_compile_args={"cxx": cxx_flags + after, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )]
    sources = sources + sorted(glob.glob("csrc/cuda/*.cpp")) + kernels
    _log(f"building the CPU and CUDA kernels from {len(sources)} sources "
         f"(TORCH_CUDA_ARCH_LIST={arch})")
    return [cpp_extension.CUDAExtension(
        name="residual_fused._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        library_dirs=libs,
        extra_compile_args={"cxx": cxx_flags + after, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )]


def _build_py_with_sources(pure):
    """build_py that also copies what a build needs (this file, csrc/ and
    _build_env.py) into the package as residual_fused/_source, so an installed
    package without compiled kernels can build them on first use (residual_fused/_jit.py).
    A ``pure`` build drops any library an earlier build left in build/."""
    from setuptools.command.build_py import build_py

    class BuildPy(build_py):
        def run(self):
            super().run()
            if pure:
                for name in ("_C*", "_cuda_stable*", "_cuda_aten*"):
                    for stale in glob.glob(os.path.join(self.build_lib, "residual_fused", name)):
                        os.remove(stale)
            target = os.path.join(self.build_lib, "residual_fused", "_source")
            files = ["setup.py", os.path.join("residual_fused", "_build_env.py")]
            for ext in ("cpp", "h", "cu", "cuh"):
                files += glob.glob(os.path.join("csrc", "**", f"*.{ext}"), recursive=True)
            for rel in files:
                self.mkpath(os.path.dirname(os.path.join(target, rel)))
                self.copy_file(os.path.join(HERE, rel), os.path.join(target, rel))

    return BuildPy


def _check_wheel_support():
    """Fail at once, in one sentence, where pip's wheel build cannot work: setuptools
    older than 70.1 builds wheels only through the separate ``wheel`` package, and
    ``--no-build-isolation`` uses the environment's own setuptools."""
    if not {"bdist_wheel", "dist_info", "editable_wheel"} & set(sys.argv[1:]):
        return
    if (importlib.util.find_spec("wheel") is None
            and importlib.util.find_spec("setuptools.command.bdist_wheel") is None):
        import setuptools
        sys.exit(f"residual_fused setup: setuptools {setuptools.__version__} here cannot build "
                 f"a wheel without the 'wheel' package; run pip install 'setuptools>=64' wheel "
                 f"ninja, then repeat the install")


def _extension_kwargs():
    if BUILD_EXT in _NO:
        _log("RESIDUAL_FUSED_BUILD_EXT=0: building the pure-Python package only")
        return {}
    build_env = _build_env()
    try:
        import torch
    except ImportError:
        return _skip("torch is not importable here; use pip install --no-build-isolation")
    cuda_skip = _cuda_reason_to_skip(torch, build_env)
    from torch.utils import cpp_extension  # after CUDA_HOME is set: it is read on import
    cxx, why_not = _pick_cxx(build_env)
    if cxx is None:
        return _skip(why_not)

    cpu_sources, cpu_flags, per_source_flags, link_flags = _cpu_kernels(build_env, cxx)
    sources = sorted(glob.glob("csrc/*.cpp")) + cpu_sources
    # torch's headers carry #pragma unroll, which g++ warns about on every file.
    cxx_flags = ["-O3", "-Wno-unknown-pragmas"] + cpu_flags
    if cuda_skip is None:
        extensions = _cuda_extensions(torch, cpp_extension, sources, cxx_flags, link_flags)
    elif BUILD_CUDA in _YES:
        raise RuntimeError(f"RESIDUAL_FUSED_BUILD_CUDA=1 but {cuda_skip}")
    else:
        _log(f"building the CPU kernels only ({cuda_skip})")
        extensions = [_cpu_extension(cpp_extension, sources, cxx_flags, link_flags)]
    build_ext = _grouped_build_ext(cpp_extension.BuildExtension, per_source_flags)
    return {"ext_modules": extensions,
            "cmdclass": {"build_ext": build_ext.with_options(use_ninja=True)}}


_check_wheel_support()
_kwargs = _extension_kwargs()
_kwargs.setdefault("cmdclass", {})["build_py"] = _build_py_with_sources(
    pure="ext_modules" not in _kwargs)
setup(**_kwargs)
