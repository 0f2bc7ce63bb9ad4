"""Tight numeric checks of one op call against the float64 reference.

Every output is compared elementwise with the reference computed in float64 from the
very inputs the kernel saw (``residual_fused.reference`` on upcast tensors), within

    |t - t_ref| <= tol_compute(t) + ulp(t.dtype, t_ref) / 2

* ``tol_compute`` is the error of the kernel's own arithmetic in its compute type
  (fp32, or fp64 for fp64 ``x``), from a first-order error model of the formulas in
  GUIDE.md: each row statistic is a sum of ``n`` terms (``n = H`` for the row
  statistics, the row count for the weight gradients), whose rounding error is
  bounded by ``LAMBDA * u * sqrt(n)`` times the sum of the terms' magnitudes (the
  probabilistic bound for sums of ``n`` rounded terms, Higham & Mary 2019, which any
  summation order meets when the rounding errors are independent, as they are for the
  random data drawn here; column sums over rows that repeat get the worst case,
  ``n u``, see ``_column_gamma``); elementwise steps add ``KAPPA * u`` relative each; the
  model propagates these through the normalise step and the backward formula. It
  holds whatever order the kernel sums in, yet it scales with the data: a mean over
  the wrong count, a missing term or a wrong sign is off by far more.
* ``ulp / 2`` is the rounding to the output's dtype: a correct kernel's 16-bit output
  is the correctly rounded value, or one ulp from it where the exact value lies within
  ``tol_compute`` of a rounding boundary. So wherever the compute tolerance is under a
  quarter ulp (nearly every element), a 16-bit output is held to 1 ulp of the
  correctly rounded fp64 reference (``ulp_error`` measures it). The exceptions are
  values near zero after cancellation (``dx`` where ``g - mean(g) - xhat * mean(g
  xhat)`` nearly cancels, ``y`` where ``bias`` cancels ``xhat * weight``): an fp32
  result is only as exact as its larger terms, so there the compute tolerance is the
  bound.

A NaN or infinity must match the reference's exactly. ``check`` raises with the worst
element's row, column, values and both tolerance terms.
"""

import math
from typing import Dict, Optional

import torch

import residual_fused.reference as reference

# Unit roundoff of the compute types.
UNIT = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
# Summation: the error of a sum of n terms is at most LAMBDA * u * sqrt(n) * sum|terms|.
LAMBDA = 4.0
# Elementwise steps (a product, a quotient, an rsqrt): at most KAPPA * u relative; a
# single rounding (the sum x + residual, an input wider than the compute type) is given
# 2 u, twice its worst case, so that no bound sits exactly at an error.
KAPPA = 8.0
# Mantissa bits and smallest normal exponent of each output dtype.
_FORMAT = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126),
           torch.float64: (52, -1022)}


def half_ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half an ulp of ``dtype`` at the (float64) values ``ref``: the largest error of a
    correctly rounded result."""
    mantissa, emin = _FORMAT[dtype]
    _, exponent = torch.frexp(ref.abs())
    exponent = torch.clamp(exponent - 1, min=emin)  # subnormals share the smallest ulp
    return torch.ldexp(torch.full_like(ref, 0.5), exponent - mantissa)


def _gamma(u: float, n: int) -> float:
    return LAMBDA * u * math.sqrt(max(n, 1))


def _row(t: torch.Tensor) -> torch.Tensor:
    """A per-row statistic as a column, to broadcast over the row."""
    return t.unsqueeze(-1)


def _f64(t):
    return None if t is None else t.to(torch.float64)


def _wider(t: torch.Tensor, u: float):
    """|t| where t's dtype is wider than the compute type (its values are rounded to
    it when loaded), else 0."""
    return t.to(torch.float64).abs() if t.dtype == torch.float64 and u > UNIT[torch.float64] else 0


def _weight(weight, n: int, offset: float) -> torch.Tensor:
    """The weight the kernels use, weight + offset, in float64 (ones without a weight)."""
    return torch.ones(n, dtype=torch.float64) if weight is None else _f64(weight) + offset


def _weight_rounding(weight, offset: float, u: float):
    """Error of the weight used, from rounding a weight wider than the compute type (an
    fp64 weight, fp32 compute) before the offset is added, as Gemma's
    ``1 + w.float()`` does: u |w|, absolute, so not relative to |w + offset| (which an
    offset can cancel). 0 where that rounding is exact or there is no offset (the
    relative KAPPA u terms cover it then)."""
    if weight is None or offset == 0:
        return 0
    return 2 * u * _wider(weight, u)


def forward_reference(x, residual, weight, bias, eps, is_rms_norm, weight_offset=0.0):
    """(y, s, rstd) in float64, and the compute tolerances of y, residual_out and rstd."""
    u = UNIT[torch.float64 if x.dtype == torch.float64 else torch.float32]
    n = x.shape[-1]
    g = _gamma(u, n)
    y, s, rstd = reference.forward(_f64(x), _f64(residual), _f64(weight), _f64(bias), eps, is_rms_norm,
                                   weight_offset)
    w = _weight(weight, n, weight_offset)
    b = torch.zeros(n, dtype=torch.float64) if bias is None else _f64(bias)
    mean_abs = _row(s.abs().mean(-1))
    r = _row(rstd)
    xhat = (s - (0 if is_rms_norm else _row(s.mean(-1)))) * r
    # s carries one rounding, plus the rounding of inputs wider than the compute type
    # (an fp64 residual added in fp32: by design, as the reference does); the mean's sum
    # error shifts every centred value; rstd's relative error (its sum, then the rsqrt)
    # scales every xhat.
    s_err = 2 * u * (s.abs() + _wider(x, u) + (0 if residual is None else _wider(residual, u)))
    shift = s_err + (0 if is_rms_norm else g * mean_abs)
    # rstd = (mean(c^2) + eps)^-1/2 of the centred values c: their errors (shift) enter
    # the mean of squares as 2 |c| shift, which dominates when the row is nearly
    # constant (|c| << |s|: the variance is ill-conditioned), then the sum's own error.
    c = xhat / r
    var = c.square().mean(-1)
    rel_rstd = ((2 * (c.abs() * shift).mean(-1) + g * var) / (2 * (var + eps)) + KAPPA * u)
    tol_rstd = rstd * rel_rstd
    tol_y = ((w.abs() * (r * shift + xhat.abs() * (_row(rel_rstd) + KAPPA * u))
              + KAPPA * u * (y.abs() + b.abs())) + xhat.abs() * _weight_rounding(weight, weight_offset, u))
    tol_res = s_err
    return (y, s, rstd), (tol_y, tol_res, tol_rstd)


def backward_reference(dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm, memory_efficient,
                       weight_offset=0.0):
    """(ds, dweight, dbias) in float64 and their compute tolerances."""
    u = UNIT[torch.float64 if dy.dtype == torch.float64 else torch.float32]
    n = dy.shape[-1]
    rows = dy.numel() // max(n, 1)
    g_n = _gamma(u, n)
    ds, dweight, dbias = reference.backward(_f64(dy), _f64(dresidual_out), _f64(saved), _f64(rstd),
                                            _f64(weight), _f64(bias), is_rms_norm, memory_efficient,
                                            weight_offset)
    w = _weight(weight, n, weight_offset)
    dw_used = _weight_rounding(weight, weight_offset, u)  # the weight used's own error, absolute
    v = _f64(saved)
    if memory_efficient:
        if bias is not None:
            v = v - _f64(bias)
        v = v / w
    r = _row(_f64(rstd))
    scale = torch.ones_like(r) if memory_efficient else r
    xhat = (v - (0 if is_rms_norm else _row(v.mean(-1)))) * scale
    # xhat rebuilt: the mean's sum error and the rounding of v (and of (y - b) / w, with
    # w's own error relative to the weight used).
    d_xhat = scale * (u * v.abs() * (2 * KAPPA if memory_efficient else 1)) + KAPPA * u * xhat.abs()
    if memory_efficient:
        d_xhat = d_xhat + scale * v.abs() * dw_used / w.abs()
    if not is_rms_norm:
        d_xhat = d_xhat + scale * g_n * _row(v.abs().mean(-1))
    d_xhat_row = _row(d_xhat.amax(-1)) if n else d_xhat
    dy64 = _f64(dy)
    g = dy64 * w
    d_g = dy64.abs() * dw_used  # g = dy * (weight used), from the weight's own error
    mean_g_abs = _row(g.abs().mean(-1))
    mean_gx = _row((g * xhat).mean(-1))
    d_mean_g = g_n * mean_g_abs + _row(d_g.mean(-1))
    d_mean_gx = (g_n * _row((g * xhat).abs().mean(-1)) + mean_g_abs * d_xhat_row
                 + _row((d_g * xhat.abs()).mean(-1)))
    core = g - (0 if is_rms_norm else _row(g.mean(-1))) - xhat * mean_gx
    tol_ds = r * (KAPPA * u * g.abs() + d_g + (0 if is_rms_norm else d_mean_g) + d_xhat * mean_gx.abs()
                  + xhat.abs() * d_mean_gx + KAPPA * u * core.abs())
    if dresidual_out is not None:
        tol_ds = tol_ds + 2 * u * (ds.abs() + _f64(dresidual_out).abs())
    tol_dw = tol_db = None
    flat = lambda t: t.reshape(-1, n)  # noqa: E731
    if weight is not None:
        terms = flat(dy64 * xhat)
        tol_dw = ((_column_gamma(u, terms) + KAPPA * u) * terms.abs().sum(0) + flat(dy64.abs() * d_xhat).sum(0))
    if bias is not None:
        tol_db = (_column_gamma(u, flat(dy64)) + KAPPA * u) * flat(dy64).abs().sum(0)
    return (ds, dweight, dbias), (tol_ds, tol_dw, tol_db)


def _column_gamma(u: float, terms: torch.Tensor) -> float:
    """Relative error bound of the column sums of `terms` ([rows, H]) over the rows.

    The probabilistic bound assumes the rounding errors of the partial sums are
    independent, as they are for the random rows the tests draw. Rows that repeat (a
    broadcast dy, ``y.sum().backward()``'s expanded ones) add the same term again and
    again: each addition in a binade rounds the same way, the errors add up linearly,
    and a long serial chain (one CPU thread's rows, one CTA's rows) can exceed
    ``LAMBDA * u * sqrt(rows)``. Those get the worst case of any order, ``(rows - 1) u``
    to first order, and ``rows * u`` here."""
    rows = terms.shape[0]
    if rows > 1 and torch.unique(terms, dim=0).shape[0] < rows:
        return max(rows * u, _gamma(u, rows))
    return _gamma(u, rows)


def check(name: str, got: torch.Tensor, ref: torch.Tensor, tol_compute: torch.Tensor) -> float:
    """Raise AssertionError if ``got`` is outside the bound; returns the worst ratio of
    error to bound (<= 1)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if got.numel() == 0:
        return 0.0
    g = got.to(torch.float64)
    finite = torch.isfinite(ref)
    # A value whose bound reaches past the dtype's overflow threshold (max + half an
    # ulp) may round to an infinity of its sign, as a correctly rounded result does.
    big = torch.tensor(torch.finfo(got.dtype).max, dtype=torch.float64)
    threshold = big + half_ulp(big, got.dtype)
    overflowed = (finite & torch.isinf(g) & (torch.sign(g) == torch.sign(ref)) &
                  (ref.abs() + tol_compute.expand_as(ref) >= threshold))
    same_special = torch.where(finite, torch.isfinite(g) | overflowed,
                               (g == ref) | (torch.isnan(g) & torch.isnan(ref)))
    if not bool(same_special.all()):
        k = int((~same_special).flatten().nonzero()[0])
        raise AssertionError(f"{name}: element {_where(got, k)} is {g.flatten()[k].item()} where the reference "
                             f"has {ref.flatten()[k].item()}")
    bound = tol_compute.expand_as(ref) + half_ulp(ref, got.dtype)
    err = torch.where(finite & ~overflowed, (g - ref).abs(), torch.zeros_like(ref))
    ratio = err / bound.clamp(min=torch.finfo(torch.float64).tiny)
    k = int(ratio.flatten().argmax())
    worst = ratio.flatten()[k].item()
    if worst > 1.0:
        raise AssertionError(
            f"{name} ({str(got.dtype).replace('torch.', '')}): element {_where(got, k)} is "
            f"{g.flatten()[k].item():.9g}, the float64 reference {ref.flatten()[k].item():.9g}: error "
            f"{err.flatten()[k].item():.3g} is {worst:.3g}x its bound (compute "
            f"{tol_compute.expand_as(ref).flatten()[k].item():.3g} + half an ulp "
            f"{half_ulp(ref, got.dtype).flatten()[k].item():.3g})")
    return worst


def ulp_error(got: torch.Tensor, ref: torch.Tensor, tol_compute: torch.Tensor) -> float:
    """The largest distance, in ulps of got's dtype, from the correctly rounded reference,
    over the elements whose compute tolerance is under a quarter ulp: there check()'s
    bound implies at most 1. (The others, values near zero after cancellation, are held
    to the compute tolerance instead.)"""
    if got.numel() == 0:
        return 0.0
    rounded = ref.to(got.dtype).to(torch.float64)
    ulp = 2 * half_ulp(rounded, got.dtype)
    counted = torch.isfinite(rounded) & torch.isfinite(got) & (tol_compute.expand_as(ref) < ulp / 4)
    diff = (got.to(torch.float64) - rounded).abs() / ulp
    return float(torch.where(counted, diff, torch.zeros_like(diff)).max())


def _where(t: torch.Tensor, flat_index: int) -> str:
    if t.dim() < 2:
        return f"[{flat_index}]"
    return f"[row {flat_index // t.shape[-1]}, col {flat_index % t.shape[-1]}]"


def _checked(worst: Dict[str, float], name: str, got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor):
    """check() one output, and note its worst error / bound under `name[dtype]`, and for
    16-bit outputs also its largest distance in ulps from the correctly rounded value
    under `name[dtype] ulps`."""
    key = f"{name}[{str(got.dtype).replace('torch.', '')}]"
    worst[key] = check(name, got, ref, tol)
    if got.dtype in (torch.float16, torch.bfloat16):
        worst[key + " ulps"] = ulp_error(got, ref, tol)


def check_forward(got: Dict[str, Optional[torch.Tensor]], x, residual, weight, bias, eps, is_rms_norm,
                  store_residual_out, weight_offset=0.0, store_mean=False) -> Dict[str, float]:
    """Every forward output of one call (y, residual_out and LayerNorm's mean if stored,
    rstd) within its bound; returns each one's worst error / bound (see _checked)."""
    (y, s, rstd), (tol_y, tol_res, tol_rstd) = forward_reference(x, residual, weight, bias, eps, is_rms_norm,
                                                                 weight_offset)
    worst: Dict[str, float] = {}
    _checked(worst, "y", got["y"], y, tol_y)
    _checked(worst, "rstd", got["rstd"], rstd, tol_rstd)
    if store_mean:
        # The sum's rounding (tol_res, every element's) and the sum over the row.
        u = UNIT[torch.float64 if x.dtype == torch.float64 else torch.float32]
        tol_mean = tol_res.mean(-1) + _gamma(u, x.shape[-1]) * s.abs().mean(-1)
        _checked(worst, "mean", got["mean"], s.mean(-1), tol_mean)
    if store_residual_out:
        _checked(worst, "residual_out", got["residual_out"], s, tol_res)
    return worst


def check_backward(got: Dict[str, Optional[torch.Tensor]], dy, dresidual_out, saved, rstd, weight, bias,
                   is_rms_norm, memory_efficient, weight_offset=0.0) -> Dict[str, float]:
    """dx, dresidual (when present), dweight and dbias within their bounds."""
    (ds, dw, db), (tol_ds, tol_dw, tol_db) = backward_reference(dy, dresidual_out, saved, rstd, weight, bias,
                                                                is_rms_norm, memory_efficient, weight_offset)
    worst: Dict[str, float] = {}
    _checked(worst, "dx", got["dx"], ds, tol_ds)
    if got.get("dresidual") is not None:
        _checked(worst, "dresidual", got["dresidual"], ds, tol_ds)
    if weight is not None:
        _checked(worst, "dweight", got["dweight"], dw, tol_dw)
    if bias is not None:
        _checked(worst, "dbias", got["dbias"], db, tol_db)
    return worst
