"""The support matrix: what the library accepts, in one place.

The support matrix (docs/usage.md; its floors in the README) is written from these
values; the argument checks in :mod:`residual_fused._validation` and the C++ glue
(csrc/) enforce them.
"""

import re
from typing import Tuple

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


#: The oldest torch each feature works with, as (major, minor). The support matrix
#: (docs/usage.md) lists the same floors; tests skip below them with this reason.
#: "core" is the ops, autograd, modules, torch.compile(fullgraph=True) and DDP.
TORCH_FLOORS = {
    "core": (2, 4),
    # torch.distributed.tensor (public DTensor, register_sharding) appeared in 2.5.
    "dtensor": (2, 5),
    # fully_shard is public from 2.6; before 2.7 its CPU (gloo) path calls
    # Stream.record_event, which CPU streams lack.
    "fsdp2": (2, 7),
    # transformers 5 (the decoder conversions: Llama, Qwen, ...) needs torch >= 2.6.
    "llama_conversion": (2, 6),
}

#: transformers versions the Hugging Face conversions were written for: [low, high).
#: The decoders' converted layers follow the transformers 5 layer loop (keyword
#: arguments, ``cache=``, output capturing by hooks).
TRANSFORMERS_RANGES = {
    "bert": ((4, 40), (6, 0)),
    "roberta": ((4, 40), (6, 0)),
    # DistilBERT's block takes its mask by keyword and returns a tensor from transformers 5
    "distilbert": ((5, 0), (6, 0)),
    **{family: ((5, 0), (6, 0)) for family in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "granite", "phi3",
        "gemma", "gemma2", "gemma3_text", "olmo2", "gpt2", "vit", "gpt_neox", "falcon", "t5", "whisper")},
}


def version_tuple(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string such as ``"2.4.1+cu121"``."""
    numbers = re.findall(r"\d+", version)[:2]
    return (int(numbers[0]), int(numbers[1]) if len(numbers) > 1 else 0)


def torch_supports(feature: str) -> bool:
    return version_tuple(torch.__version__) >= TORCH_FLOORS[feature]


def torch_floor_reason(feature: str) -> str:
    """The skip reason / error text for a feature this torch is too old for."""
    major, minor = TORCH_FLOORS[feature]
    return f"{feature} needs torch >= {major}.{minor} (installed: {torch.__version__})"
