"""The support matrix in residual_fused/support.py agrees with the kernels' headers."""

import os
import re

import torch

from residual_fused import support
from tools import cuda_emulator

KERNELS = os.path.join(os.path.dirname(__file__), "..", "csrc", "kernels")
HEADER = open(os.path.join(KERNELS, "add_norm.h")).read()
PARAMS = open(os.path.join(KERNELS, "params.h")).read()
ENUM_NAMES = {"kFloat32": torch.float32, "kFloat16": torch.float16, "kBFloat16": torch.bfloat16,
              "kFloat64": torch.float64}


def test_max_hidden_size_matches_the_kernels():
    assert int(re.search(r"kMaxHidden = (\d+);", HEADER).group(1)) == support.MAX_CUDA_HIDDEN_SIZE


def test_dtypes_match_the_kernels_enum():
    body = re.search(r"enum class DType[^{]*\{([^}]*)\}", PARAMS).group(1)
    codes = {ENUM_NAMES[name]: int(value) for name, value in re.findall(r"(k\w+) = (\d+)", body)}
    assert set(codes) == set(support.SUPPORTED_DTYPES)
    assert codes == cuda_emulator.DTYPE_CODE  # the emulator passes the same codes
