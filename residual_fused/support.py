"""The support matrix: what the library accepts, in one place.

The README's support table is written from these values; the argument checks
in :mod:`residual_fused._validation` and the C++ glue (csrc/) enforce them.
"""

import torch

#: dtypes accepted for ``x``, ``residual``, ``weight``, ``bias`` (any mix) and
#: for ``residual_dtype``. float64 exists for ``torch.autograd.gradcheck``.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Largest normalized size (product of ``normalized_shape``) the CUDA kernels
#: accept (``kMaxHidden`` in csrc/kernels/add_norm.h). The reference has no limit.
MAX_CUDA_HIDDEN_SIZE = 262144

#: Largest normalized size the CPU kernels accept (the params structs' int hidden;
#: csrc/add_norm_cpu.cpp).
MAX_CPU_HIDDEN_SIZE = 2**31 - 1


def compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the statistics and of all arithmetic: fp64 for fp64 ``x``, else fp32."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32
