"""Every line of csrc/kernels the emulator compiles is executed by the quick emulated
suite and the fuzzer's regression cases, or is listed in tests/coverage_unreachable.txt
with the reason (tests/kernel_coverage.py; ``make coverage`` measures the whole suite)."""

import shutil

import pytest

import kernel_coverage

pytestmark = pytest.mark.slow

SUMMARIES = []


def test_every_kernel_line_runs_or_is_listed_as_unreachable():
    if shutil.which("gcov") is None:
        pytest.skip("needs gcov")
    try:
        cov = kernel_coverage.measure(full=False)
    except FileNotFoundError as why:
        pytest.skip(str(why))
    SUMMARIES.append(kernel_coverage.report(cov).splitlines()[0].replace("the emulated suite",
                                                                          "the quick emulated suite"))
    missing, stale = kernel_coverage.check(cov)
    assert not missing, "lines never executed and not listed as unreachable:\n" + "\n".join(
        f"  {f}:{n}: {t}" for f, n, t in missing)
    assert not stale, "entries of coverage_unreachable.txt that match no unexecuted line:\n" + "\n".join(
        f"  {e.file}: {e.text}" for e in stale)
