"""residual_fused: the residual add fused with LayerNorm / RMSNorm ("Add & Norm").

``add_layer_norm`` / ``add_rms_norm`` (functional; ``out=`` for inference),
``add_layer_norm_`` / ``add_rms_norm_`` (in place, for inference), ``FusedAddNorm`` /
``FusedAddRMSNorm`` (modules), ``AddNormFunction`` (their autograd in Python, where
the compiled library is not loaded; with it, the op ``add_norm``'s autograd is C++)
and ``reference`` (plain differentiable PyTorch, the oracle).
"""

from . import reference
from .functional import add_layer_norm, add_layer_norm_, add_rms_norm, add_rms_norm_
from .modules import FusedAddNorm, FusedAddRMSNorm
from ._loader import cpu_kernels_available, cuda_kernels_available
from .ops import AddNormFunction

__version__ = "0.1.0"

__all__ = [
    "AddNormFunction",
    "FusedAddNorm",
    "FusedAddRMSNorm",
    "add_layer_norm",
    "add_layer_norm_",
    "add_rms_norm",
    "add_rms_norm_",
    "cpu_kernels_available",
    "cuda_kernels_available",
    "reference",
]
