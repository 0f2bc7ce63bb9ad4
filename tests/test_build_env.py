"""setup.py's choice of C++ compiler (residual_fused/_build_env.py).

A compiler that copies libstdc++ into shared libraries builds an extension that
crashes on its first error message; setup.py must detect it and use another."""

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
