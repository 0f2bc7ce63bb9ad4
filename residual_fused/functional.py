"""Functional Add & Norm: ``norm(x + residual)``, post-norm or pre-norm.

Post-norm (BERT, the original Transformer) returns ``y``; pre-norm (GPT, Llama)
returns ``(y, residual_out)`` where ``residual_out = x + residual`` is the new
residual stream. Calls that need no gradient go straight to the forward op,
skipping autograd's bookkeeping (it matters at decode sizes).
"""

import torch

from . import distributed
from ._validation import check_add_norm_args, checked_weight_offset, residual_out_dtype
from .ops import AddNormFunction, add_norm_fwd


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_dtype,
              memory_efficient, normalized_shape, weight_offset):
    shape, hidden, eps = check_add_norm_args(
        x, residual, weight, bias, eps, normalized_shape, residual_dtype, is_rms_norm
    )
    weight_offset = checked_weight_offset(weight_offset, weight)
    prenorm, memory_efficient = bool(prenorm), bool(memory_efficient)
    out_dtype = residual_out_dtype(x, residual, residual_dtype)
    if distributed.is_dtensor(x):
        distributed.check_row_sharding(x, len(shape))
        distributed.register_sharding_rules()
    folded = len(shape) > 1
    if folded:  # the ops normalize the last dim: fold normalized_shape into it
        rows_shape = x.shape[: x.dim() - len(shape)]
        x_in = x.reshape(*rows_shape, hidden)
        residual_in = None if residual is None else residual.reshape(*rows_shape, hidden)
        weight_in = None if weight is None else weight.reshape(hidden)
        bias_in = None if bias is None else bias.reshape(hidden)
    else:
        x_in, residual_in, weight_in, bias_in = x, residual, weight, bias

    if _needs_grad(x, residual, weight, bias):
        out = AddNormFunction.apply(x_in, residual_in, weight_in, bias_in, eps, is_rms_norm,
                                    prenorm, out_dtype, memory_efficient, weight_offset)
    else:
        y, residual_out = add_norm_fwd(x_in, residual_in, weight_in, bias_in, eps,
                                       is_rms_norm, prenorm, out_dtype, weight_offset)[:2]
        out = (y, residual_out) if prenorm else y

    if folded:
        if prenorm:
            return out[0].view(x.shape), out[1].view(x.shape)
        return out.view(x.shape)
    return out


def add_layer_norm(x, residual=None, weight=None, bias=None, eps=1e-5, *, prenorm=False,
                   residual_dtype=None, memory_efficient=False, normalized_shape=None,
                   weight_offset=0.0):
    """``LayerNorm(x + residual) * weight + bias``, fused.

    Args:
        x: the branch output, ``[..., *normalized_shape]``; fp16, bf16, fp32 or fp64.
        residual: the residual stream, same shape as ``x`` (any supported dtype),
            or None to normalize ``x`` alone.
        weight, bias: shape ``normalized_shape`` (any supported dtype), or None.
        eps: added to the variance; non-negative.
        prenorm: also return ``residual_out = x + residual`` (``x`` when ``residual``
            is None) for the next block.
        residual_dtype: dtype of ``residual_out`` (default: the residual's dtype,
            else ``x.dtype``); ``torch.float32`` keeps the residual stream in fp32.
        memory_efficient: save the output instead of the sum for backward (one
            fewer activation in post-norm). Needs every weight element nonzero:
            ``xhat`` is recomputed as ``(y - bias) / weight``.
        normalized_shape: trailing dims to normalize over; defaults to
            ``weight.shape``, else ``x.shape[-1:]``.
        weight_offset: the weight used is ``weight + weight_offset``, added in the
            compute dtype inside the kernel (Gemma's ``1 + w``: ``weight_offset=1``).
            The gradient returned for ``weight`` is that of ``weight`` itself.

    Returns:
        ``y`` with x's shape and dtype, or ``(y, residual_out)`` when ``prenorm``.
        Statistics are computed in fp32 (fp64 for fp64 ``x``) from the unrounded sum.
    """
    return _add_norm(x, residual, weight, bias, eps, False, prenorm, residual_dtype,
                     memory_efficient, normalized_shape, weight_offset)


def add_rms_norm(x, residual=None, weight=None, eps=None, *, prenorm=False,
                 residual_dtype=None, memory_efficient=False, normalized_shape=None,
                 weight_offset=0.0):
    """``RMSNorm(x + residual) * weight``, fused.

    Same arguments as :func:`add_layer_norm`, without ``bias``. ``eps=None``
    means ``torch.finfo(x.dtype).eps``, as in ``torch.nn.RMSNorm``.
    """
    return _add_norm(x, residual, weight, None, eps, True, prenorm, residual_dtype,
                     memory_efficient, normalized_shape, weight_offset)
