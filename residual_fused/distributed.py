"""DTensor support: sharding rules for the two ops (Megatron-style sequence parallel).

Rows may be sharded over any leading dim; weight and bias are replicated; outputs are
sharded like the inputs, and the weight gradients come back as ``Partial`` sums that
DTensor reduces across ranks when they are redistributed. Sharding over the
normalized dim is refused with a clear error by the functional API (a norm needs
the whole row on one rank). The rules are registered on first use of a DTensor.
"""

import functools
import importlib

import torch

_OPS = torch.ops.residual_fused


@functools.lru_cache(maxsize=None)
def _dtensor_class():
    """DTensor's class, or None where torch has no distributed package. Imported on
    first need (it takes 0.7 s); its module moved in torch 2.5."""
    for module in ("torch.distributed.tensor", "torch.distributed._tensor"):
        try:
            return getattr(importlib.import_module(module), "DTensor")
        except (ImportError, AttributeError):
            continue
    return None


def is_dtensor(t) -> bool:
    # type() and isinstance, not hasattr: dynamo traces both on a tensor, while
    # hasattr(tensor, "placements") breaks fullgraph=True on torch 2.4. Plain tensors
    # and parameters answer without importing DTensor.
    if type(t) in (torch.Tensor, torch.nn.Parameter) or t is None:
        return False
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def check_row_sharding(x, normalized_ndim: int) -> None:
    """Raise unless every Shard placement of DTensor ``x`` is over a row (leading) dim."""
    first_normalized = x.dim() - normalized_ndim
    for placement in x.placements:
        dim = getattr(placement, "dim", None)
        if dim is not None and (dim if dim >= 0 else dim + x.dim()) >= first_normalized:
            raise ValueError(
                f"x: DTensor sharded over dim {dim}, a normalized dim; Add & Norm needs whole "
                f"rows on each rank. Shard over a leading (row) dim, e.g. the sequence dim "
                f"for sequence parallelism, or redistribute to Replicate() first")


@functools.lru_cache(maxsize=None)
def register_sharding_rules() -> None:
    """Register the DTensor sharding strategies of add_norm_fwd / add_norm / add_norm_bwd (once)."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    def rep_or_none(t):
        return None if t is None else Replicate()

    @register_sharding(_OPS.add_norm_fwd.default)
    def _fwd(x, residual, weight, bias, eps, is_rms_norm, store_residual_out, residual_out_dtype,
             weight_offset=0.0, store_mean=False):
        options = []
        for dim in range(x.ndim - 1):
            row = Shard(dim)
            # outputs: y, residual_out and mean (placeholders unless stored), rstd
            outputs = [row, row if store_residual_out else Replicate(), row,
                       row if store_mean else Replicate()]
            inputs = [row, None if residual is None else row, rep_or_none(weight),
                      rep_or_none(bias), None, None, None, None, None, None]
            options.append((outputs, inputs))
        options.append(([Replicate()] * 4, [Replicate(), rep_or_none(residual), rep_or_none(weight),
                                            rep_or_none(bias), None, None, None, None, None, None]))
        return options

    @register_sharding(_OPS.add_norm.default)
    def _add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                  memory_efficient=False, weight_offset=0.0):
        # below autograd (inference mode): the forward alone, y and residual_out
        options = []
        for dim in range(x.ndim - 1):
            row = Shard(dim)
            inputs = [row, None if residual is None else row, rep_or_none(weight), rep_or_none(bias)] + [None] * 6
            options.append(([row, row if prenorm else Replicate()], inputs))
        options.append(([Replicate()] * 2, [Replicate(), rep_or_none(residual), rep_or_none(weight),
                                            rep_or_none(bias)] + [None] * 6))
        return options

    @register_sharding(_OPS.add_norm_bwd.default)
    def _bwd(dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm, memory_efficient,
             dresidual_dtype, weight_offset=0.0, mean=None):
        options = []
        for dim in range(dy.ndim - 1):
            row = Shard(dim)
            outputs = [row, Replicate() if dresidual_dtype is None else row,
                       Replicate() if weight is None else Partial(),
                       Replicate() if bias is None else Partial()]
            inputs = [row, None if dresidual_out is None else row, row, row, rep_or_none(weight),
                      rep_or_none(bias), None, None, None, None, None if mean is None else row]
            options.append((outputs, inputs))
        replicated = [Replicate(), rep_or_none(dresidual_out), Replicate(), Replicate(),
                      rep_or_none(weight), rep_or_none(bias), None, None, None, None,
                      rep_or_none(mean)]
        options.append(([Replicate()] * 4, replicated))
        return options
