"""Pure-PyTorch Add & Norm: the oracle every other path is tested against.

Two layers live here:

* :func:`forward` / :func:`backward`: the math of the library's two ops on rows of
  the last dim (``[..., H]``), with fp32 statistics (fp64 for fp64 ``x``). They are
  the op implementation wherever the compiled extension is absent.
* :func:`add_layer_norm` / :func:`add_rms_norm`: plain differentiable functions
  with the same signatures as the functional API, built on :func:`forward`.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._validation import check_add_norm_args, checked_weight_offset, residual_out_dtype
from .support import compute_dtype


def check_weight_offset(weight_offset: float, weight: Optional[Tensor]) -> None:
    """The ops' rule for weight_offset (the compiled kernels check the same)."""
    if not -math.inf < weight_offset < math.inf:
        raise RuntimeError(f"weight_offset must be finite, got {weight_offset}")
    if weight_offset != 0 and weight is None:
        raise RuntimeError("weight_offset: an offset is added to the weight, so it needs a weight")


def check_mean(mean: Optional[Tensor], is_rms_norm: bool, memory_efficient: bool,
               rstd: Optional[Tensor] = None) -> None:
    """The backward op's rule for its ``mean`` argument (the compiled kernels check the
    same): LayerNorm's forward mean, absent for RMSNorm and in memory-efficient mode."""
    if mean is None:
        return
    if is_rms_norm:
        raise RuntimeError("mean: RMSNorm has no row mean; pass None")
    if memory_efficient:
        raise RuntimeError("mean: the memory-efficient backward rebuilds xhat from y, whose mean "
                           "is not the forward's; pass None")
    if rstd is not None and (mean.dtype != rstd.dtype or mean.numel() != rstd.numel()):
        raise RuntimeError(f"mean must hold one {str(rstd.dtype).replace('torch.', '')} per row (the "
                           f"forward's mean output), got {mean.dtype} with {mean.numel()} elements")


def _byte_span(t: Tensor):
    """The bytes [first, last] ``t``'s elements span, or None when it has none."""
    if t.numel() == 0:
        return None
    far = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    first = t.data_ptr()
    return first, first + (far + 1) * t.element_size() - 1


def _overlap(a: Tensor, b: Tensor) -> bool:
    sa, sb = _byte_span(a), _byte_span(b)
    return sa is not None and sb is not None and sa[0] <= sb[1] and sb[0] <= sa[1]


def _same_elements(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.is_contiguous() and b.is_contiguous())


def check_output_buffers(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                         bias: Optional[Tensor], out: Tensor, residual_out: Optional[Tensor],
                         out_name: str = "out", residual_out_name: str = "residual_out") -> None:
    """The rules of the forms that write into buffers the caller owns (the compiled
    kernels check the same, csrc/glue_impl.h): each buffer has x's shape and device and
    is contiguous, ``out`` has x's dtype, and a buffer is either exactly an input (the
    same first byte, dtype and shape, both contiguous: written over in place) or clear
    of every input and of the other buffer."""
    if out.dtype != x.dtype:
        raise RuntimeError(f"{out_name}: dtype must be x's (the normalized output has x's dtype)")
    inputs = (("x", x), ("residual", residual), ("weight", weight), ("bias", bias))
    for name, buf in ((out_name, out), (residual_out_name, residual_out)):
        if buf is None:
            continue
        if buf.device != x.device:
            raise RuntimeError(f"{name} is on {buf.device} but x is on {x.device}; all tensors must be on "
                               f"the same device")
        if buf.shape != x.shape:
            raise RuntimeError(f"{name}: shape {list(buf.shape)} must equal x's {list(x.shape)}")
        if not buf.is_contiguous():
            raise RuntimeError(f"{name}: must be contiguous (the kernels write whole rows densely)")
        if buf.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise RuntimeError(f"{name}: dtype {buf.dtype} is not supported; use float16, bfloat16, float32 "
                               f"or float64")
        for input_name, t in inputs:
            if t is not None and _overlap(buf, t) and not _same_elements(buf, t):
                raise RuntimeError(f"{name} overlaps {input_name} without being {input_name} itself: pass a "
                                   f"separate buffer, or {input_name} itself (contiguous, of the same dtype) "
                                   f"to write over it in place")
    if residual_out is not None and _overlap(out, residual_out):
        raise RuntimeError(f"{out_name} and {residual_out_name} overlap: the two outputs need separate memory")


def effective_weight(weight: Tensor, acc: torch.dtype, weight_offset: float = 0.0) -> Tensor:
    """``weight + weight_offset`` in the compute dtype (the offset added only when
    nonzero, as the kernels do: a -0.0 element keeps its sign without one)."""
    w = weight.to(acc)
    return w + weight_offset if weight_offset != 0 else w


def forward(
    x: Tensor,  # [..., H]
    residual: Optional[Tensor],  # [..., H]
    weight: Optional[Tensor],  # [H]
    bias: Optional[Tensor],  # [H]
    eps: float,
    is_rms_norm: bool,
    weight_offset: float = 0.0,  # the weight used is weight + weight_offset (Gemma: 1)
) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Normalize ``s = x + residual`` over the last dim.

    Returns ``(y, s, rstd)``: ``y`` in x's dtype; ``s`` and ``rstd`` in the compute
    dtype and unrounded. ``s`` may be ``x`` itself when no residual is given and x
    already has the compute dtype.
    """
    acc = compute_dtype(x.dtype)
    s = x.to(acc)
    if residual is not None:
        s = s + residual.to(acc)
    if is_rms_norm:
        rstd = torch.rsqrt(s.square().mean(-1) + eps)
        xhat = s * rstd.unsqueeze(-1)
    else:
        # Two-pass statistics: the centred variance avoids E[s^2] - E[s]^2 cancellation.
        mean = s.mean(-1)
        centred = s - mean.unsqueeze(-1)
        rstd = torch.rsqrt(centred.square().mean(-1) + eps)
        xhat = centred * rstd.unsqueeze(-1)
    y = xhat
    if weight is not None:
        y = y * effective_weight(weight, acc, weight_offset)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), s, rstd


def backward(
    dy: Tensor,  # [..., H]
    dresidual_out: Optional[Tensor],  # [..., H], pre-norm only
    saved: Tensor,  # [..., H]: residual_out, or y when memory_efficient
    rstd: Tensor,  # [...]
    weight: Optional[Tensor],  # [H]
    bias: Optional[Tensor],  # [H]
    is_rms_norm: bool,
    memory_efficient: bool,
    weight_offset: float = 0.0,  # the forward's: g uses weight + weight_offset
    mean: Optional[Tensor] = None,  # [...]: the forward's row mean (LayerNorm), or None
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradient of the sum ``ds`` (compute dtype) and, if present, dweight and dbias (fp32).

    ``xhat`` is rebuilt from ``saved``: from the sum as ``s * rstd`` (LayerNorm:
    ``(s - mean(s)) * rstd``), or in memory-efficient mode from the output as
    ``(y - bias) / (weight + weight_offset)``, which needs every element of that to be
    nonzero. dweight is the gradient of ``weight`` itself (the offset is a constant).

    LayerNorm's xhat has zero mean by construction, so it is re-centred over the
    row after the rebuild. ``saved`` is rounded to its dtype while rstd came from
    the unrounded sum; without the re-centring the rounding error enters as a mean
    shift times rstd, which is catastrophic for near-constant rows (H = 1 gives
    garbage instead of a zero gradient). The forward's ``mean``, where given, changes
    nothing here: re-centred, xhat is the same whatever mean it was first shifted by.
    The compiled kernels use it as that shift, so that the row's sums are taken in one
    reduction (``sum(v - mean)`` is then near zero and cancels nothing).
    """
    check_mean(mean, is_rms_norm, memory_efficient, rstd)
    acc = rstd.dtype
    r = rstd.unsqueeze(-1)
    xhat = saved.to(acc)
    if memory_efficient:
        if bias is not None:
            xhat = xhat - bias.to(acc)
        if weight is not None:
            xhat = xhat / effective_weight(weight, acc, weight_offset)
        if not is_rms_norm:
            xhat = xhat - xhat.mean(-1, keepdim=True)
    elif is_rms_norm:
        xhat = xhat * r
    else:
        xhat = (xhat - xhat.mean(-1, keepdim=True)) * r
    dy_acc = dy.to(acc)
    g = dy_acc * effective_weight(weight, acc, weight_offset) if weight is not None else dy_acc
    gx = (g * xhat).mean(-1, keepdim=True)
    if is_rms_norm:
        ds = (g - xhat * gx) * r
    else:
        ds = (g - g.mean(-1, keepdim=True) - xhat * gx) * r
    if dresidual_out is not None:
        ds = ds + dresidual_out.to(acc)
    hidden = dy.shape[-1]
    dweight = (dy_acc * xhat).reshape(-1, hidden).sum(0) if weight is not None else None
    dbias = dy_acc.reshape(-1, hidden).sum(0) if bias is not None else None
    return ds, dweight, dbias


def _add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_dtype,
              normalized_shape, weight_offset):
    shape, hidden, eps = check_add_norm_args(
        x, residual, weight, bias, eps, normalized_shape, residual_dtype, is_rms_norm
    )
    weight_offset = checked_weight_offset(weight_offset, weight)
    rows_shape = x.shape[: x.dim() - len(shape)]
    flat = lambda t: None if t is None else t.reshape(*rows_shape, hidden)  # noqa: E731
    y, s, _ = forward(
        flat(x), flat(residual),
        None if weight is None else weight.reshape(hidden),
        None if bias is None else bias.reshape(hidden),
        eps, is_rms_norm, weight_offset,
    )
    y = y.view(x.shape)
    if not prenorm:
        return y
    out_dtype = residual_out_dtype(x, residual, residual_dtype)
    return y, s.to(out_dtype, copy=s is x).view(x.shape)


def add_layer_norm(x, residual=None, weight=None, bias=None, eps=1e-5, *, prenorm=False,
                   residual_dtype=None, memory_efficient=False, normalized_shape=None,
                   weight_offset=0.0):
    """Reference ``LayerNorm(x + residual)``; same signature as the functional API.

    ``memory_efficient`` only changes what the fused path saves for backward, so
    it has no effect here.
    """
    del memory_efficient
    return _add_norm(x, residual, weight, bias, eps, False, prenorm, residual_dtype,
                     normalized_shape, weight_offset)


def add_rms_norm(x, residual=None, weight=None, eps=None, *, prenorm=False,
                 residual_dtype=None, memory_efficient=False, normalized_shape=None,
                 weight_offset=0.0):
    """Reference ``RMSNorm(x + residual)``; same signature as the functional API."""
    del memory_efficient
    return _add_norm(x, residual, weight, None, eps, True, prenorm, residual_dtype,
                     normalized_shape, weight_offset)
