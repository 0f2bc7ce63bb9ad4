"""Minimal bytes each Add & Norm variant must move (the project guide's byte floor).

Time is decided by bytes for this memory-bound op, so every benchmark row reports
GB/s of the bytes *that variant* must read plus write. Fused kernels (ours,
torch.compile, fused peers) are charged the fused minimum; the unfused eager pair
is charged what it really moves, including the materialised sum.
"""

import dataclasses
from typing import Optional

import torch

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Config:
    norm: str  # "layer" or "rms"
    prenorm: bool
    rows: int
    hidden: int
    x_dtype: torch.dtype = torch.bfloat16
    residual_dtype: torch.dtype = torch.bfloat16  # the residual input's dtype
    weight_dtype: torch.dtype = torch.bfloat16
    residual_out_dtype: Optional[torch.dtype] = None  # default: residual_dtype
    memory_efficient: bool = False

    @property
    def out_dtype(self) -> torch.dtype:
        return self.residual_out_dtype or self.residual_dtype

    @property
    def has_bias(self) -> bool:
        return self.norm == "layer"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def fused_bytes(cfg: Config, mode: str) -> int:
    """Bytes a fused kernel pair must move: each input read once, each output written once."""
    e = cfg.rows * cfg.hidden
    sx, sr, so = _size(cfg.x_dtype), _size(cfg.residual_dtype), _size(cfg.out_dtype)
    params = cfg.hidden * _size(cfg.weight_dtype) * (2 if cfg.has_bias else 1)
    rstd = cfg.rows * 4
    stores_sum = cfg.prenorm or not cfg.memory_efficient
    fwd = e * (sx + sr + sx) + (e * so if stores_sum else 0) + params + rstd
    saved = sx if cfg.memory_efficient else so
    bwd = (e * (sx + saved) + (e * so if cfg.prenorm else 0)  # dy, saved, d(residual_out)
           + e * sx + (e * sr if sr != sx else 0)  # dx, and dresidual when its dtype differs
           + 2 * params + rstd)  # read weight/bias, write their gradients
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def eager_bytes(cfg: Config, mode: str) -> int:
    """Bytes the unfused pair moves: ``s = x + r`` is written, then read back by the norm."""
    e = cfg.rows * cfg.hidden
    sx, sr, so = _size(cfg.x_dtype), _size(cfg.residual_dtype), _size(cfg.out_dtype)
    params = cfg.hidden * _size(cfg.weight_dtype) * (2 if cfg.has_bias else 1)
    stats = cfg.rows * 4 * (2 if cfg.norm == "layer" else 1)
    fwd = e * (sx + sr + so) + e * (so + sx) + params + stats  # add; norm
    bwd = e * (sx + so + so) + 2 * params + stats  # norm backward: dy, s -> ds
    if cfg.prenorm:
        bwd += e * (so + so + so)  # ds + d(residual_out) -> ds
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
