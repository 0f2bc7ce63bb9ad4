import os

import pytest
import torch

# No test builds kernels into the user's cache by accident: the first-use build is
# tested in subprocesses that turn it on with a cache of their own (test_install.py).
os.environ.setdefault("RESIDUAL_FUSED_JIT", "0")

import residual_fused as rf


def _cuda_param():
    reason = "needs a CUDA GPU"
    return pytest.param("cuda", marks=[pytest.mark.cuda,
                                       pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)])


#: Parametrize a test over every device present: CPU always, CUDA when available.
DEVICES = ["cpu", _cuda_param()]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def has_cuda_kernels() -> bool:
    return torch.cuda.is_available() and rf.cuda_kernels_available()


@pytest.fixture(scope="session")
def kernel_build():
    """csrc/kernels compiled by nvcc for sm_80 and sm_90 (tools/cubin.py, cached under
    build/kernel-audit/); skips where nvcc is missing."""
    from tools import cubin

    try:
        return cubin.build()
    except FileNotFoundError as why:
        pytest.skip(str(why))


def pytest_terminal_summary(terminalreporter):
    """What the fuzzer, the generated mutants and the coverage run measured, if they ran."""
    import sys

    for module in ("fuzz_emulated", "test_generated_mutants", "test_kernel_coverage"):
        for line in getattr(sys.modules.get(module), "SUMMARIES", []):
            terminalreporter.write_line(line)
