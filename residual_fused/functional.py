"""Functional Add & Norm: ``norm(x + residual)``, post-norm or pre-norm.

Post-norm (BERT, the original Transformer) returns ``y``; pre-norm (GPT, Llama)
returns ``(y, residual_out)`` where ``residual_out = x + residual`` is the new
residual stream. Both go through the op ``add_norm``, whose autograd is in C++ where
the compiled library is loaded. At decode sizes the call path costs more than the
kernel, so the common call is checked and run in one C call (``_C.functional_add_norm``);
any other is checked here, once per call signature, with errors that name the argument.

For inference, ``out=`` / ``residual_out=`` write into buffers the caller owns, and
:func:`add_rms_norm_` / :func:`add_layer_norm_` update ``x`` and ``residual`` in place
(vLLM's ``fused_add_rms_norm``). Neither records a gradient: both refuse inputs that
need one.
"""

import torch

from . import distributed, ops
from ._validation import check_add_norm_args, checked_weight_offset, residual_out_dtype, validated_call
from .ops import NO_GRAD_FORMS, call_add_norm, call_fwd_inplace, call_fwd_out, grad_needed


def _checked(x, residual, weight, bias, eps, is_rms_norm, residual_dtype, normalized_shape, weight_offset,
             compiling):
    """``(normalized_shape, hidden, eps, weight_offset, residual_out dtype)``, checked:
    once per call signature, or in full while torch.compile traces (the checks
    themselves go into the trace, not a cache lookup)."""
    if not compiling:
        return validated_call(x, residual, weight, bias, eps, normalized_shape, residual_dtype, is_rms_norm,
                              weight_offset)
    shape, hidden, eps = check_add_norm_args(x, residual, weight, bias, eps, normalized_shape, residual_dtype,
                                             is_rms_norm)
    return (shape, hidden, eps, checked_weight_offset(weight_offset, weight),
            residual_out_dtype(x, residual, residual_dtype))


def _fold(x, residual, weight, bias, shape, hidden, written):
    """The ops normalize the last dim: a multi-dim normalized_shape is folded into it.
    Tensors the call writes (``written``: x and residual in place) fold only as views."""
    if len(shape) == 1:
        return x, residual, weight, bias
    rows_shape = x.shape[: x.dim() - len(shape)]

    def fold(t, name):
        return _rows_view(t, rows_shape, hidden, name) if written else t.reshape(*rows_shape, hidden)

    return (fold(x, "x"), None if residual is None else fold(residual, "residual"),
            None if weight is None else weight.reshape(hidden), None if bias is None else bias.reshape(hidden))


def _rows_view(t, rows_shape, hidden, name):
    """``t`` ([..., *normalized_shape]) as [..., H] without a copy: the kernels write
    into it, so a copy would drop their results."""
    if not t.is_contiguous():
        raise RuntimeError(f"{name}: must be contiguous (the kernels write whole rows densely)")
    return t.view(*rows_shape, hidden)


def _add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_dtype,
              memory_efficient, normalized_shape, weight_offset, out=None, residual_out=None):
    # The common case, checked and run in one C call (csrc/module.cpp); anything else,
    # and every call torch.compile traces, takes the Python path below.
    compiling = torch.compiler.is_compiling()
    if not compiling and ops._c_module is not None:
        result = ops._c_module.functional_add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm,
                                                   residual_dtype, memory_efficient, normalized_shape,
                                                   weight_offset, out, residual_out)
        if result is not NotImplemented:
            return result
    return _add_norm_checked(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_dtype,
                             memory_efficient, normalized_shape, weight_offset, out, residual_out, compiling)


def _add_norm_checked(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_dtype,
                      memory_efficient, normalized_shape, weight_offset, out, residual_out, compiling):
    """``_add_norm`` with its checks in Python: every rule, each error naming the argument."""
    shape, hidden, eps, weight_offset, out_dtype = _checked(
        x, residual, weight, bias, eps, is_rms_norm, residual_dtype, normalized_shape, weight_offset, compiling)
    if distributed.is_dtensor(x):
        distributed.check_row_sharding(x, len(shape))
        distributed.register_sharding_rules()
    x_in, residual_in, weight_in, bias_in = _fold(x, residual, weight, bias, shape, hidden, written=False)
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
    if grad_needed(x, residual, weight, bias, out, residual_out):
        raise RuntimeError(f"out=/residual_out=: a tensor requires grad; {NO_GRAD_FORMS}")
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
    compiling = torch.compiler.is_compiling()
    if not compiling and ops._c_module is not None:  # the common case in one C call, as in _add_norm
        result = ops._c_module.functional_add_norm_(x, residual, weight, bias, eps, is_rms_norm, normalized_shape,
                                                    weight_offset)
        if result is not NotImplemented:
            return result
    return _add_norm_checked_(x, residual, weight, bias, eps, is_rms_norm, normalized_shape, weight_offset, name,
                              compiling)


def _add_norm_checked_(x, residual, weight, bias, eps, is_rms_norm, normalized_shape, weight_offset, name,
                       compiling):
    """``_add_norm_`` with its checks in Python."""
    if residual is None:
        raise ValueError(f"residual: {name} updates the residual stream in place, so it needs one")
    shape, hidden, eps, weight_offset, _ = _checked(x, residual, weight, bias, eps, is_rms_norm, None,
                                                    normalized_shape, weight_offset, compiling)
    if grad_needed(x, residual, weight, bias):
        raise RuntimeError(f"{name}: a tensor requires grad; {NO_GRAD_FORMS}")
    if distributed.is_dtensor(x):
        raise NotImplementedError(f"{name}: DTensor inputs are not supported in place; use the out-of-place "
                                  f"form")
    x_in, residual_in, weight_in, bias_in = _fold(x, residual, weight, bias, shape, hidden, written=True)
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
