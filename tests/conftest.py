import pytest
import torch

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
