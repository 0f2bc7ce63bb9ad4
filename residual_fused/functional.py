"""Functional Add & Norm: ``norm(x + residual)``, post-norm or pre-norm.

Post-norm (BERT, the original Transformer) returns ``y``; pre-norm (GPT, Llama)
returns ``(y, residual_out)`` where ``residual_out = x + residual`` is the new
residual stream. Both go through the op ``add_norm``, whose autograd is in C++ where
the compiled library is loaded; validation runs once per call signature (it matters
at decode sizes, where the call path costs more than the kernel).

For inference, ``out=`` / ``residual_out=`` write into buffers the caller owns, and
:func:`add_rms_norm_` / :func:`add_layer_norm_` update ``x`` and ``residual`` in place
(vLLM's ``fused_add_rms_norm``). Neither records a gradient: both refuse inputs that
need one.
"""

import torch

from . import distributed
from ._validation import check_add_norm_args, checked_weight_offset, validated_call
from .ops import call_add_norm, call_fwd_inplace, call_fwd_out


def _needs_grad(x, residual=None, weight=None, bias=None, *more) -> bool:
    # Spelled out, not any() over a generator: this runs on every call.
    if not torch.is_grad_enabled():
        return False
    return (x.requires_grad or (residual is not None and residual.requires_grad)
            or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
            or any(t is not None and t.requires_grad for t in more))


_NO_GRAD = ("write into buffers and record no gradient; call them under torch.no_grad() or "
            "torch.inference_mode(), or leave them out for training")


def _rows_view(t, rows_shape, hidden, name):
    """``t`` ([..., *normalized_shape]) as [..., H] without a copy: the kernels write
    into it, so a copy would drop their results."""
    if not t.is_contiguous():
        raise RuntimeError(f"{name}: must be contiguous (the kernels write whole rows densely)")
    return t.view(*rows_shape, hidden)


def _add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_dtype,
              memory_efficient, normalized_shape, weight_offset, out=None, residual_out=None):
    compiling = torch.compiler.is_compiling()
    if compiling:  # traced once: the checks themselves go into the trace, not a cache lookup
        shape, hidden, eps = check_add_norm_args(
            x, residual, weight, bias, eps, normalized_shape, residual_dtype, is_rms_norm
        )
        weight_offset = checked_weight_offset(weight_offset, weight)
        out_dtype = residual_dtype or (residual.dtype if residual is not None else x.dtype)
    else:
        shape, hidden, eps, weight_offset, out_dtype = validated_call(
            x, residual, weight, bias, eps, normalized_shape, residual_dtype, is_rms_norm, weight_offset)
    if type(x) is not torch.Tensor and distributed.is_dtensor(x):
        distributed.check_row_sharding(x, len(shape))
        distributed.register_sharding_rules()
    if len(shape) > 1:  # the ops normalize the last dim: fold normalized_shape into it
        rows_shape = x.shape[: x.dim() - len(shape)]
        x_in = x.reshape(*rows_shape, hidden)
        residual_in = None if residual is None else residual.reshape(*rows_shape, hidden)
        weight_in = None if weight is None else weight.reshape(hidden)
        bias_in = None if bias is None else bias.reshape(hidden)
    else:
        x_in, residual_in, weight_in, bias_in = x, residual, weight, bias

    if out is not None or residual_out is not None:
        return _add_norm_into(x, x_in, residual_in, weight_in, bias_in, eps, is_rms_norm, bool(prenorm), out_dtype,
                              weight_offset, out, residual_out, residual, weight, bias)
    y, residual_out = call_add_norm(x_in, residual_in, weight_in, bias_in, eps, is_rms_norm, bool(prenorm),
                                    out_dtype, bool(memory_efficient), weight_offset, compiling)
    if x_in is not x:  # folded
        return (y.view(x.shape), residual_out.view(x.shape)) if prenorm else y.view(x.shape)
    return (y, residual_out) if prenorm else y


def _add_norm_into(x, x_in, residual_in, weight_in, bias_in, eps, is_rms_norm, prenorm, out_dtype,
                   weight_offset, out, residual_out, residual, weight, bias):
    """The out= form: y into ``out``, the new residual into ``residual_out`` (each
    allocated when not given)."""
    if residual_out is not None and not prenorm:
        raise ValueError("residual_out: only the pre-norm form (prenorm=True) returns the new residual")
    if _needs_grad(x, residual, weight, bias, out, residual_out):
        raise RuntimeError(f"out=/residual_out=: a tensor requires grad; out= and residual_out= {_NO_GRAD}")
    for name, buf in (("out", out), ("residual_out", residual_out)):
        if buf is not None and not isinstance(buf, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
    if residual_out is not None and residual_out.dtype != out_dtype:
        raise ValueError(f"residual_out: dtype {residual_out.dtype} must be the new residual's, {out_dtype} "
                         f"(residual_dtype if given, else the residual's dtype)")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if prenorm and residual_out is None:
        residual_out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rows_shape, hidden = x_in.shape[:-1], x_in.shape[-1]
    out_in, residual_out_in = out, residual_out
    if x_in is not x:  # folded: the buffers must fold the same way, as views
        for name, buf in (("out", out), ("residual_out", residual_out)):
            if buf is not None and buf.shape != x.shape:
                raise RuntimeError(f"{name}: shape {list(buf.shape)} must equal x's {list(x.shape)}")
        out_in = _rows_view(out, rows_shape, hidden, "out")
        residual_out_in = None if residual_out is None else _rows_view(residual_out, rows_shape, hidden,
                                                                       "residual_out")
    call_fwd_out(x_in, residual_in, weight_in, bias_in, eps, is_rms_norm, weight_offset, out_in,
                 residual_out_in)
    return (out, residual_out) if prenorm else out


def _add_norm_(x, residual, weight, bias, eps, is_rms_norm, normalized_shape, weight_offset, name):
    if residual is None:
        raise ValueError(f"residual: {name} updates the residual stream in place, so it needs one")
    shape, hidden, eps = check_add_norm_args(x, residual, weight, bias, eps, normalized_shape, None,
                                             is_rms_norm)
    weight_offset = checked_weight_offset(weight_offset, weight)
    if _needs_grad(x, residual, weight, bias):
        raise RuntimeError(f"{name}: a tensor requires grad; the in-place forms {_NO_GRAD}")
    if distributed.is_dtensor(x):
        raise NotImplementedError(f"{name}: DTensor inputs are not supported in place; use the out-of-place "
                                  f"form")
    x_in, residual_in, weight_in, bias_in = x, residual, weight, bias
    if len(shape) > 1:  # fold normalized_shape into the last dim, as views of the same memory
        rows_shape = x.shape[: x.dim() - len(shape)]
        x_in = _rows_view(x, rows_shape, hidden, "x")
        residual_in = _rows_view(residual, rows_shape, hidden, "residual")
        weight_in = None if weight is None else weight.reshape(hidden)
        bias_in = None if bias is None else bias.reshape(hidden)
    call_fwd_inplace(x_in, residual_in, weight_in, bias_in, eps, is_rms_norm, weight_offset)
    return x, residual


def add_layer_norm(x, residual=None, weight=None, bias=None, eps=1e-5, *, prenorm=False,
                   residual_dtype=None, memory_efficient=False, normalized_shape=None,
                   weight_offset=0.0, out=None, residual_out=None):
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
        out: inference only: a contiguous buffer of x's shape and dtype to write ``y``
            into (it may be ``x`` itself); it is returned.
        residual_out: inference only, with ``prenorm``: a contiguous buffer of x's
            shape and the new residual's dtype to write ``x + residual`` into (it may
            be ``residual`` itself). A buffer must otherwise not overlap any input or
            the other buffer. Both raise if a tensor requires grad.

    Returns:
        ``y`` with x's shape and dtype, or ``(y, residual_out)`` when ``prenorm``.
        Statistics are computed in fp32 (fp64 for fp64 ``x``) from the unrounded sum.
    """
    return _add_norm(x, residual, weight, bias, eps, False, prenorm, residual_dtype,
                     memory_efficient, normalized_shape, weight_offset, out, residual_out)


def add_rms_norm(x, residual=None, weight=None, eps=None, *, prenorm=False,
                 residual_dtype=None, memory_efficient=False, normalized_shape=None,
                 weight_offset=0.0, out=None, residual_out=None):
    """``RMSNorm(x + residual) * weight``, fused.

    Same arguments as :func:`add_layer_norm`, without ``bias``. ``eps=None``
    means ``torch.finfo(x.dtype).eps``, as in ``torch.nn.RMSNorm``.
    """
    return _add_norm(x, residual, weight, None, eps, True, prenorm, residual_dtype,
                     memory_efficient, normalized_shape, weight_offset, out, residual_out)


def add_layer_norm_(x, residual, weight=None, bias=None, eps=1e-5, *, normalized_shape=None,
                    weight_offset=0.0):
    """In place, for inference: ``residual += x`` (kept in residual's dtype), then
    ``x = LayerNorm(residual) * weight + bias``, fused into one pass; returns
    ``(x, residual)``.

    ``x`` and ``residual`` must be contiguous and separate; the other arguments are
    those of :func:`add_layer_norm`. Raises if a tensor requires grad.
    """
    return _add_norm_(x, residual, weight, bias, eps, False, normalized_shape, weight_offset,
                      "add_layer_norm_")


def add_rms_norm_(x, residual, weight=None, eps=None, *, normalized_shape=None, weight_offset=0.0):
    """In place, for inference: ``residual += x`` (kept in residual's dtype), then
    ``x = RMSNorm(residual) * weight``, fused into one pass; returns ``(x, residual)``
    (vLLM's ``fused_add_rms_norm``).

    ``x`` and ``residual`` must be contiguous and separate; the other arguments are
    those of :func:`add_rms_norm`. Raises if a tensor requires grad.
    """
    return _add_norm_(x, residual, weight, None, eps, True, normalized_shape, weight_offset, "add_rms_norm_")
