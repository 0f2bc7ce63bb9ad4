"""Argument checks shared by the functional API, the reference and the modules.

Every check runs before any computation and raises with the argument's name and
the rule it broke. Nothing here touches tensor data (no device synchronisation).
"""

import math
import numbers
import operator
from typing import Optional, Sequence, Tuple

import torch

from .support import SUPPORTED_DTYPES

_DTYPE_NAMES = "float16, bfloat16, float32 or float64"
_SUPPORTED = frozenset(SUPPORTED_DTYPES)


def _shape(t: torch.Size) -> Tuple[int, ...]:
    return tuple(t)


def _check_tensor(name: str, t, device: Optional[torch.device]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(
            f"{name}: dtype {t.dtype} is not supported; x, residual, weight and bias "
            f"must be floating point ({_DTYPE_NAMES}), in any mix"
        )
    if device is not None and t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but x is on {device}; all tensors passed to "
            f"Add & Norm must be on the same device"
        )


def canonical_normalized_shape(normalized_shape) -> Tuple[int, ...]:
    """``int`` or sequence of ints -> tuple, as ``nn.LayerNorm`` accepts it."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if isinstance(normalized_shape, torch.Size):  # already ints: skip the conversion
        shape = tuple(normalized_shape)
    else:
        try:  # operator.index, not int(): a size of 3.5 is an error, not 3
            shape = tuple(operator.index(d) for d in normalized_shape)
        except TypeError:
            raise TypeError(f"normalized_shape must be an int or a sequence of ints, "
                            f"got {normalized_shape!r}") from None
    if not shape or min(shape) <= 0:
        raise ValueError(
            f"normalized_shape must be non-empty with positive sizes, got {shape}"
        )
    return shape


def check_add_norm_args(
    x,
    residual,
    weight,
    bias,
    eps,
    normalized_shape: Optional[Sequence[int]],
    residual_dtype: Optional[torch.dtype],
    is_rms_norm: bool,
) -> Tuple[Tuple[int, ...], int, float]:
    """Validate one Add & Norm call.

    Returns ``(normalized_shape, hidden_size, eps)`` with defaults resolved:
    ``normalized_shape`` falls back to ``weight.shape``, then ``x.shape[-1:]``;
    an RMSNorm ``eps`` of ``None`` becomes ``torch.finfo(x.dtype).eps``.
    """
    _check_tensor("x", x, None)
    if x.dim() == 0:
        raise ValueError("x: a 0-d tensor has nothing to normalize; x needs at least one dim")
    device = x.device
    if residual is not None:
        _check_tensor("residual", residual, device)
        if residual.shape != x.shape:
            raise ValueError(
                f"residual: shape {_shape(residual.shape)} does not match x's shape "
                f"{_shape(x.shape)}. Add & Norm adds the residual to x elementwise, so "
                f"both must have the same shape; if the widths differ, project the "
                f"residual first (for example with an nn.Linear)"
            )
    if weight is not None:
        _check_tensor("weight", weight, device)
    if bias is not None:
        if is_rms_norm:
            raise ValueError(
                "bias: RMSNorm has no bias; pass bias=None, or use add_layer_norm "
                "for a norm with a bias"
            )
        _check_tensor("bias", bias, device)

    if normalized_shape is not None:
        shape, source = canonical_normalized_shape(normalized_shape), "the normalized_shape argument"
    elif weight is not None:
        shape, source = canonical_normalized_shape(weight.shape), "weight.shape"
    else:
        shape, source = canonical_normalized_shape(x.shape[-1:]), "x's last dim"
    if x.dim() < len(shape) or x.shape[x.dim() - len(shape):] != shape:
        hint = ("; pass normalized_shape, or a weight whose shape is x's trailing "
                "normalized dims" if source == "weight.shape" else "")
        raise ValueError(
            f"x: trailing dims of shape {_shape(x.shape)} must equal normalized_shape "
            f"{shape}, which was taken from {source}{hint}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name}: shape {_shape(t.shape)} must equal normalized_shape {shape}, "
                f"which was taken from {source}"
            )

    if residual_dtype is not None and residual_dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"residual_dtype must be one of {_DTYPE_NAMES} (or None), got {residual_dtype}"
        )

    if eps is None and is_rms_norm:
        eps = torch.finfo(x.dtype).eps
    eps = checked_eps(eps)

    return shape, shape[0] if len(shape) == 1 else math.prod(shape), eps


def checked_eps(eps, where: str = "") -> float:
    """``eps`` as a float; raises unless it is a finite non-negative number.
    ``where`` names the caller in the message (for example a module's constructor)."""
    if type(eps) is not float:  # the common case skips these checks
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ValueError(f"eps{where} must be a finite non-negative number, got {eps!r}")
        eps = float(eps)
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"eps{where} must be a finite non-negative number, got {eps!r}")
    return eps


def checked_weight_offset(weight_offset, weight, where: str = "") -> float:
    """``weight_offset`` as a float; raises unless it is a finite number, and, when
    nonzero, unless there is a weight to add it to (``weight`` None only in a module
    without elementwise_affine or a call without weight)."""
    if type(weight_offset) is not float:  # any real number (numpy scalars too), not a bool
        if isinstance(weight_offset, bool) or not isinstance(weight_offset, numbers.Real):
            raise ValueError(f"weight_offset{where} must be a finite number, got {weight_offset!r}")
        weight_offset = float(weight_offset)
    if not -math.inf < weight_offset < math.inf:  # a comparison: torch.compile traces it (NaN fails it too)
        raise ValueError(f"weight_offset{where} must be a finite number, got {weight_offset!r}")
    if weight_offset != 0.0 and weight is None:
        raise ValueError(f"weight_offset{where} is {weight_offset}, but there is no weight to add it to "
                         f"(the weight used is weight + weight_offset)")
    return weight_offset


def residual_out_dtype(x, residual, residual_dtype: Optional[torch.dtype]) -> torch.dtype:
    """dtype of ``residual_out``: ``residual_dtype``, else the residual's, else x's."""
    if residual_dtype is not None:
        return residual_dtype
    return residual.dtype if residual is not None else x.dtype


# ---- validated once per call signature ---------------------------------------------------
# Every rule above depends only on the arguments' types, shapes, dtypes and devices and
# on the scalars, so a call whose signature passed once passes again: the functional
# API looks it up instead of re-checking (at decode sizes the checks cost more than the
# kernel). Bounded; anything unhashable is checked in full every time.
_VALIDATED: dict = {}
_VALIDATED_MAX = 512


def validated_call(x, residual, weight, bias, eps, normalized_shape, residual_dtype, is_rms_norm,
                   weight_offset) -> Tuple[Tuple[int, ...], int, float, float, torch.dtype]:
    """``(normalized_shape, hidden_size, eps, weight_offset, residual_out dtype)`` of a
    call, with every check of :func:`check_add_norm_args`, :func:`checked_weight_offset`
    and the defaults of :func:`residual_out_dtype`; from the cache when its signature
    was validated before."""
    try:
        key = (x.__class__, x.shape, x.dtype, x.device,
               None if residual is None else (residual.__class__, residual.shape, residual.dtype, residual.device),
               None if weight is None else (weight.__class__, weight.shape, weight.dtype, weight.device),
               None if bias is None else (bias.__class__, bias.shape, bias.dtype, bias.device),
               eps, normalized_shape, residual_dtype, is_rms_norm, weight_offset)
        hit = _VALIDATED.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable: the full checks say why
        key = hit = None
    if hit is not None:
        return hit
    shape, hidden, checked_eps_ = check_add_norm_args(x, residual, weight, bias, eps, normalized_shape,
                                                      residual_dtype, is_rms_norm)
    result = (shape, hidden, checked_eps_, checked_weight_offset(weight_offset, weight),
              residual_out_dtype(x, residual, residual_dtype))
    if key is not None:
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[key] = result
    return result
