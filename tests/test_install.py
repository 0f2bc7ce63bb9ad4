"""Installing and building: the doctor command, the first-use build and its cache
key, and real installs into a fresh virtual environment (slow)."""

import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

import residual_fused as rf
from residual_fused import __main__ as cli
from residual_fused import _jit, _loader, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None


def _doctor() -> str:
    out = io.StringIO()
    cli.doctor(out)
    return out.getvalue()


def test_doctor_reports_versions_kernels_and_support():
    text = _doctor()
    assert f"torch                  {torch.__version__}" in text
    assert rf.__version__ in text
    cpu_line = next(line for line in text.splitlines() if line.startswith("CPU kernels"))
    assert ("loaded" in cpu_line.split()[2:3]) == rf.cpu_kernels_available()
    assert "build cache" in text and "support on this machine" in text
    if torch.version.cuda is None:
        assert "is a CPU build. Fix: install a CUDA build of torch" in text


def test_doctor_says_why_and_how_to_fix(monkeypatch):
    monkeypatch.setattr(_loader, "has_kernel", lambda key: False)
    monkeypatch.setattr(_jit, "toolchain", lambda: (None, None, "no CUDA toolkit was found"))
    text = _doctor()
    assert "CPU kernels            not built: no C++ compiler was found. Fix: install g++" in text
    monkeypatch.setattr(_jit, "toolchain", lambda: ("/usr/bin/c++", None, ""))
    monkeypatch.setattr(_jit, "cached_libraries", lambda cuda: [])
    monkeypatch.setenv("RESIDUAL_FUSED_JIT", "0")
    assert "RESIDUAL_FUSED_JIT=0. Fix: python -m residual_fused build" in _doctor()
    monkeypatch.setenv("RESIDUAL_FUSED_JIT", "1")
    assert "the first cpu op builds them" in _doctor()
    assert "kernel variant" not in _doctor()
    monkeypatch.setenv("RESIDUAL_FUSED_VARIANT", "rows:pt=32")  # a tuning override is never silent
    assert "kernel variant         rows:pt=32 (RESIDUAL_FUSED_VARIANT, for tuning" in _doctor()


def test_cache_key_changes_with_torch_sources_and_cuda(monkeypatch, tmp_path):
    root = _jit.source_root()
    assert root is not None, "the sources must be found beside the package"
    key = _jit.cache_key(root, None)
    assert key == _jit.cache_key(root, None) and key.startswith("torch")
    assert _jit.cache_key(root, "13.0") != key
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert _jit.cache_key(root, None) != key
    monkeypatch.undo()
    shutil.copytree(os.path.join(root, "csrc"), tmp_path / "csrc")
    (tmp_path / "residual_fused").mkdir()
    shutil.copy(os.path.join(root, "setup.py"), tmp_path)
    shutil.copy(os.path.join(root, "residual_fused", "_build_env.py"), tmp_path / "residual_fused")
    assert _jit.cache_key(str(tmp_path), None) == key
    with open(tmp_path / "csrc" / "glue.h", "a") as f:
        f.write("\n")
    assert _jit.cache_key(str(tmp_path), None) != key


def _venv(path) -> str:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True)
    return str(path / "bin" / "python")


def _add_torch(python) -> None:
    """Make this environment's torch (and what it imports) importable in the venv,
    after the venv's own packages, instead of a second multi-GB download."""
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "zz_torch_from_test.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")


def _pip(python, *args, cwd):
    return subprocess.run([python, "-m", "pip", "install", "--no-deps", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_install_into_a_fresh_venv_then_build_on_first_use(tmp_path):
    """The README's install command in a fresh venv: with too old a setuptools and no
    wheel it fails at once in one sentence; with them but without torch, the package
    installs without kernels (as an isolated build does) but with their sources, and
    once torch is there the first op builds the kernels, loads them, and caches them."""
    src = tmp_path / "src"  # a clean copy: no build/ left over from an in-place build
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        "build", ".venv", ".git", "*.so", "__pycache__", "bench", "tests", "_source"))
    python = _venv(tmp_path / "venv")
    has_setuptools = subprocess.run([python, "-c", "import setuptools"]).returncode == 0
    lacks_bdist = subprocess.run([python, "-c", "import importlib.util as u; import sys; "
                                  "sys.exit(bool(u.find_spec('wheel') or "
                                  "u.find_spec('setuptools.command.bdist_wheel')))"]).returncode == 0
    first = _pip(python, "--no-build-isolation", str(src), cwd=tmp_path)
    if has_setuptools and lacks_bdist:
        assert first.returncode != 0
        assert "cannot build a wheel without the 'wheel' package; run pip install" in (
            first.stdout + first.stderr)
    elif not has_setuptools:  # Python >= 3.12 venvs have no setuptools: pip says so
        assert first.returncode != 0 and "setuptools" in first.stdout + first.stderr

    tools = subprocess.run([python, "-m", "pip", "install", "-q", "setuptools>=64", "wheel"],
                           capture_output=True, text=True)
    if tools.returncode != 0:
        pytest.skip(f"no package index reachable for setuptools/wheel: {tools.stderr[-300:]}")
    # No torch in the venv yet: the package installs without kernels and says why.
    installed = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                "-v", str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert "building the pure-Python package only (torch is not importable here" in (
        installed.stdout + installed.stderr)
    _add_torch(python)  # then torch arrives, as after pip install torch

    script = ("import torch, residual_fused as rf, residual_fused._jit as jit\n"
              "print('source', jit.source_root())\n"
              "x, r = torch.randn(6, 96), torch.randn(6, 96)\n"
              "y = rf.add_rms_norm(x, r)\n"
              "print('kernels', rf.cpu_kernels_available())\n"
              "print('err', (y - rf.reference.add_rms_norm(x, r)).abs().max().item())\n")
    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_env.update(RESIDUAL_FUSED_CACHE=str(tmp_path / "cache"), MAX_JOBS="2",
                   RESIDUAL_FUSED_JIT="1")
    off = subprocess.run([python, "-W", "always", "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env={**run_env, "RESIDUAL_FUSED_JIT": "0"})
    assert off.returncode == 0, off.stderr[-3000:]
    assert "kernels False" in off.stdout and "slower PyTorch reference" in off.stderr
    assert "residual_fused/_source" in off.stdout.replace(os.sep, "/")
    if not HAS_CXX:
        return
    built = subprocess.run([python, "-c", script], capture_output=True, text=True,
                           cwd=tmp_path, env=run_env, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "building the CPU kernels for torch" in built.stderr
    assert "built the CPU kernels in" in built.stderr
    assert "kernels True" in built.stdout
    assert float(built.stdout.split("err ")[1]) < 1e-5
    again = subprocess.run([python, "-c", script], capture_output=True, text=True,
                           cwd=tmp_path, env=run_env)
    assert "kernels True" in again.stdout and "building" not in again.stderr  # cached
    ahead = subprocess.run([python, "-m", "residual_fused", "build"], capture_output=True,
                           text=True, cwd=tmp_path, env=run_env)
    assert ahead.returncode == 0 and "built: " in ahead.stdout and "building" not in ahead.stderr


def _first_use_world(monkeypatch, registered, cuda_version):
    """A process where the kernels of `registered` are loaded and a toolkit of
    `cuda_version` builds on first use."""
    monkeypatch.setenv("RESIDUAL_FUSED_JIT", "1")
    monkeypatch.setattr(_loader, "_jit_tried", set())
    monkeypatch.setattr(_loader, "extension_loaded", True)
    monkeypatch.setattr(_loader, "has_kernel", lambda key: registered[key])
    monkeypatch.setattr(_loader, "loaded_libraries", [])
    monkeypatch.setattr(_jit, "toolchain", lambda: ("/usr/bin/c++", cuda_version, ""))


@pytest.mark.parametrize("cuda_loaded", [False, True])
def test_first_use_build_loads_only_what_is_missing(monkeypatch, cuda_loaded):
    """After a torch upgrade the stable-ABI CUDA library still loads while _C does not:
    the first CPU op then builds the CPU kernels alone and loads only _C (registering
    the CUDA kernels twice would fail)."""
    registered = {"CPU": False, "CUDA": cuda_loaded}
    calls, loaded = [], []
    _first_use_world(monkeypatch, registered, "13.0")

    def build(quiet=False, with_cuda=True, cuda_only=False):
        assert not cuda_only  # the CPU kernels are missing here
        calls.append(with_cuda)
        return ["/cache/residual_fused/_C.so"] + (["/cache/residual_fused/_cuda_stable.abi3.so"]
                                                   if with_cuda else [])

    def load(path):
        loaded.append(os.path.basename(path))
        registered["CUDA" if "_cuda_stable" in path else "CPU"] = True

    monkeypatch.setattr(_jit, "build", build)
    monkeypatch.setattr(torch.ops, "load_library", load)
    monkeypatch.setattr(_loader, "built_for", lambda library: torch.__version__)
    assert ops._build_on_first_use(torch.device("cpu")) is True
    assert calls == [not cuda_loaded]
    assert loaded == (["_C.so"] if cuda_loaded else ["_C.so", "_cuda_stable.abi3.so"])
    assert ops._build_on_first_use(torch.device("cpu")) is False  # once per process
    assert len(calls) == 1


def test_first_use_on_cuda_beside_a_cpu_only_c(monkeypatch):
    """A CPU-only _C installed under a CUDA torch without the stable ABI (< 2.10): the
    first CUDA op builds the CUDA kernels alone (_cuda_aten) and loads them; a _C with
    both would be skipped, its CPU kernels being registered already."""
    registered = {"CPU": True, "CUDA": False}
    calls, loaded = [], []
    _first_use_world(monkeypatch, registered, "12.8")

    def build(quiet=False, with_cuda=True, cuda_only=False):
        calls.append((with_cuda, cuda_only))
        return ["/cache/residual_fused/_cuda_aten.so"]

    def load(path):
        loaded.append(os.path.basename(path))
        registered["CUDA"] = True

    monkeypatch.setattr(_jit, "build", build)
    monkeypatch.setattr(torch.ops, "load_library", load)
    assert ops._build_on_first_use(torch.device("cuda")) is True
    assert calls == [(True, True)] and loaded == ["_cuda_aten.so"]


def test_cuda_only_builds_have_their_own_cache_key():
    root = _jit.source_root()
    if root is None:
        pytest.skip("no sources")
    assert _jit.cache_key(root, "12.8") != _jit.cache_key(root, "12.8", cuda_only=True)
    assert "-cudaonly-" in _jit.cache_key(root, "12.8", cuda_only=True)


def test_extension_of_another_torch_is_not_imported(tmp_path):
    """A _C built for another torch can import without an error and register its
    kernels under the wrong dispatch keys (seen: a torch 2.14 build under 2.12
    registered its CPU kernel as 'Undefined'), so it is refused before import."""
    library = tmp_path / "_C.so"
    assert _loader.built_for(str(library)) is None
    with pytest.raises(ImportError, match=r"built for torch \(unknown\)"):
        _loader.import_c(str(library))
    (tmp_path / "_C.build.json").write_text('{"torch": "2.12.1+cu130"}')
    assert _loader.built_for(str(library)) == "2.12.1+cu130"
    if torch.__version__ != "2.12.1+cu130":
        with pytest.raises(ImportError, match=r"built for torch 2.12.1\+cu130, and this is torch "):
            _loader.import_c(str(library))
    if rf.cpu_kernels_available():  # the real one names this torch
        assert _loader.built_for(_loader.loaded_libraries[0]) == torch.__version__
