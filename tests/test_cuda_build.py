"""Every kernel source compiles with nvcc for sm_80 and sm_90 without register spills.

Runs wherever ``nvcc`` is on PATH (no GPU or torch build needed: the kernels include
no torch headers) and skips otherwise. A spill or local-memory stack frame in any
kernel fails the test: every kernel here is on a path some shape takes.
"""

import concurrent.futures
import os
import re
import shutil
import subprocess

import pytest

KERNEL_DIR = os.path.join(os.path.dirname(__file__), "..", "csrc", "kernels")
SOURCES = sorted(f for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))
ARCHS = ("80", "90")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH"),
]

_ENTRY = re.compile(r"Function properties for (\S+)")
_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_ARCH = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")


def compile_report(source, tmp_path):
    """{(kernel, arch): (stack, spill stores, spill loads)} from ptxas -v for one source."""
    cmd = ["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xptxas=-v", "-c",
           os.path.join(KERNEL_DIR, source), "-o", str(tmp_path / (source + ".o"))]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr[-4000:]}"
    report, arch, kernel = {}, None, None
    for line in proc.stderr.splitlines():
        if m := _ARCH.search(line):
            arch = m.group(2)
        elif m := _ENTRY.search(line):
            kernel = m.group(1)
        elif (m := _USAGE.search(line)) and kernel is not None:
            report[(kernel, arch)] = tuple(int(g) for g in m.groups())
            kernel = None
    return report


def test_kernels_compile_without_spills(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        reports = dict(zip(SOURCES, pool.map(lambda s: compile_report(s, tmp_path), SOURCES)))
    kernels = {(src, k): usage for src, rep in reports.items() for k, usage in rep.items()}
    # Every source with kernels reported for both architectures.
    for src in ("fwd_rows.cu", "fwd_streamed.cu", "bwd_rows.cu", "bwd_streamed.cu"):
        assert {arch for (s, (_, arch)) in kernels if s == src} == set(ARCHS), src
    spilled = {f"{src}: {name} sm_{arch}": usage
               for (src, (name, arch)), usage in kernels.items() if any(usage)}
    assert not spilled, f"kernels with stack/spills (stack, stores, loads): {spilled}"
