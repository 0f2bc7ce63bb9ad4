"""setup.py's build environment checks (residual_fused/_build_env.py): the C++ compiler
(a compiler that copies libstdc++ into shared libraries builds an extension that
crashes on its first error message) and the CUDA toolkit (found from nvcc's real
folder, its version matched against torch's, its headers present)."""

import importlib.util
import os
import shutil
import stat

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "residual_fused", "_build_env.py")
_spec = importlib.util.spec_from_file_location("_build_env", _PATH)
build_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_env)


def _executable(path, text="#!/bin/sh\nexit 1\n"):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("nm") is None,
                    reason="needs g++ and nm")
def test_probe_tells_static_from_dynamic_libstdcxx(tmp_path):
    assert build_env.links_cxx_runtime_statically("g++") is False
    wrapper = _executable(tmp_path / "g++-static",
                          f'#!/bin/sh\nexec {shutil.which("g++")} "$@" -static-libstdc++\n')
    verdict = build_env.links_cxx_runtime_statically(wrapper)
    if verdict is None:
        pytest.skip("this g++ has no static libstdc++ to link")
    assert verdict is True


def test_probe_of_a_broken_compiler_is_undecided(tmp_path):
    assert build_env.links_cxx_runtime_statically(_executable(tmp_path / "cc-broken")) is None
    assert build_env.links_cxx_runtime_statically(str(tmp_path / "missing")) is None


def test_pick_keeps_a_good_compiler_and_replaces_a_static_one(tmp_path):
    bin_a, bin_b = tmp_path / "a", tmp_path / "b"
    bin_a.mkdir()
    bin_b.mkdir()
    bad = _executable(bin_a / "g++")
    good = _executable(bin_b / "g++")
    probe = {bad: True, good: False}.get
    path = os.pathsep.join([str(bin_a), str(bin_b)])
    assert build_env.pick_cxx(good, path=path, probe=probe) == (good, None)
    chosen, message = build_env.pick_cxx(bad, path=path, probe=probe)
    assert chosen == good and bad in message and "statically" in message
    # Undecided (no nm, say): keep what the user has.
    assert build_env.pick_cxx(bad, path=path, probe=lambda c: None) == (bad, None)


def test_pick_refuses_when_every_compiler_links_statically(tmp_path):
    bad = _executable(tmp_path / "g++")
    with pytest.raises(RuntimeError, match="links libstdc\\+\\+ statically"):
        build_env.pick_cxx(bad, path=str(tmp_path), probe=lambda c: True)


def test_flag_probe_accepts_what_the_compiler_takes(tmp_path):
    # -fopenmp decides whether the CPU kernels run on several threads; a compiler that
    # refuses it (or is missing) must give False, not fail the build.
    assert build_env.compiler_accepts(_executable(tmp_path / "cc-broken"), ["-fopenmp"]) is False
    assert build_env.compiler_accepts(str(tmp_path / "missing"), ["-fopenmp"]) is False
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    assert build_env.compiler_accepts("g++", ["-O1"]) is True
    assert build_env.compiler_accepts("g++", ["-fno-such-flag"]) is False


def _fake_toolkit(root, release="12.4", headers=build_env.CUDA_HEADERS):
    """A toolkit folder whose nvcc answers --dryrun and --version as nvcc does."""
    (root / "bin").mkdir(parents=True)
    for header in headers:
        (root / "include" / header).parent.mkdir(parents=True, exist_ok=True)
        (root / "include" / header).write_text("")
    return _executable(root / "bin" / "nvcc", (
        "#!/bin/sh\n"
        f'case "$1" in\n  --dryrun) echo "#$ TOP={root}/bin/.." ;;\n'
        f'  --version) echo "Cuda compilation tools, release {release}, V{release}.1" ;;\nesac\n'))


def test_cuda_home_comes_from_nvcc_itself_not_from_a_wrapper_folder(tmp_path):
    real = _fake_toolkit(tmp_path / "cuda-12.4")
    wrapper = _executable(tmp_path / "wrapper-bin-nvcc", f'#!/bin/sh\nexec {real} "$@"\n')
    home, source = build_env.find_cuda_home({}, which=lambda name: wrapper)
    assert home == str(tmp_path / "cuda-12.4") and wrapper in source
    assert build_env.nvcc_version(os.path.join(home, "bin", "nvcc")) == "12.4"
    assert build_env.missing_cuda_headers(home) == []
    # An explicit CUDA_HOME wins, as it does for torch.
    assert build_env.find_cuda_home({"CUDA_HOME": "/opt/x"}, which=lambda n: wrapper) == (
        "/opt/x", "CUDA_HOME")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_home_of_the_real_nvcc_has_the_build_headers(tmp_path):
    wrapper = _executable(tmp_path / "nvcc", f'#!/bin/sh\nexec {shutil.which("nvcc")} "$@"\n')
    home, _ = build_env.find_cuda_home({}, which=lambda name: wrapper)
    assert build_env.missing_cuda_headers(home) == []
    assert build_env.nvcc_version(os.path.join(home, "bin", "nvcc")) is not None


def test_missing_headers_and_version_mismatch_are_named(tmp_path):
    _fake_toolkit(tmp_path / "partial", headers=("cuda_runtime.h",))
    assert build_env.missing_cuda_headers(str(tmp_path / "partial")) == ["crt/host_defines.h"]
    assert build_env.cuda_mismatch("13.0", "13.2") is None
    message = build_env.cuda_mismatch("13.0", "12.1")
    assert message == ("the CUDA toolkit is 13.0, while torch was built with CUDA 12.1; "
                       "their major versions must match")


def test_cuda_toolkit_decides_in_one_sentence(tmp_path):
    real = _fake_toolkit(tmp_path / "cuda-12.4")
    wrapper = _executable(tmp_path / "nvcc", f'#!/bin/sh\nexec {real} "$@"\n')
    home = str(tmp_path / "cuda-12.4")
    assert build_env.cuda_toolkit("12.1", "2.4.1+cu121", {}, lambda n: wrapper) == (home, "12.4", "")
    assert build_env.cuda_toolkit("13.0", "2.14.1+cu130", {}, lambda n: wrapper) == (
        None, None, f"the CUDA toolkit at {home} (from the toolkit of {wrapper}) is 12.4, while "
                    f"torch 2.14.1+cu130 was built with CUDA 13.0; their major versions must match")
    _fake_toolkit(tmp_path / "partial", headers=("cuda_runtime.h",))
    assert "lacks crt/host_defines.h" in build_env.cuda_toolkit(
        "12.1", "2.4.1", {"CUDA_HOME": str(tmp_path / "partial")})[2]
