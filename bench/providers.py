"""The implementations a benchmark row compares, behind one interface.

A provider turns a :class:`byte_model.Config` into a function
``fn(x, residual, weight, bias) -> y | (y, residual_out)`` with the semantics of
``residual_fused.add_layer_norm`` / ``add_rms_norm`` for that config, or raises
:class:`Unavailable` with a one-line reason. Providers never install anything.
"""

from typing import Callable, Dict

import torch
import torch.nn.functional as F

import residual_fused as rf
from byte_model import Config


class Unavailable(Exception):
    """A provider cannot run this config here; the message says why."""


def _eager(cfg: Config) -> Callable:
    out_dtype = cfg.out_dtype

    def add_norm(x, residual, weight, bias):
        s = (x + residual).to(out_dtype)
        z = s.to(weight.dtype)
        if cfg.norm == "rms":
            y = F.rms_norm(z, (z.shape[-1],), weight, 1e-6)
        else:
            y = F.layer_norm(z, (z.shape[-1],), weight, bias, 1e-5)
        y = y.to(x.dtype)
        return (y, s) if cfg.prenorm else y

    return add_norm


def _compiled(cfg: Config) -> Callable:
    if cfg.memory_efficient:
        raise Unavailable("torch.compile has no memory-efficient mode (same as its default)")
    # Each config compiles its own closure of the same code object; start from a clean
    # cache so earlier configs do not count towards dynamo's recompile limit.
    torch._dynamo.reset()
    return torch.compile(_eager(cfg), fullgraph=True, dynamic=False)


def _ours(cfg: Config) -> Callable:
    kwargs = dict(prenorm=cfg.prenorm, residual_dtype=cfg.residual_out_dtype,
                  memory_efficient=cfg.memory_efficient)
    if cfg.norm == "rms":
        return lambda x, r, w, b: rf.add_rms_norm(x, r, w, 1e-6, **kwargs)
    return lambda x, r, w, b: rf.add_layer_norm(x, r, w, b, 1e-5, **kwargs)


#: name -> (factory, byte model: "fused" or "eager")
PROVIDERS: Dict[str, tuple] = {
    "eager": (_eager, "eager"),
    "compile": (_compiled, "fused"),
    "residual_fused": (_ours, "fused"),
}


def make(name: str, cfg: Config) -> Callable:
    factory, _ = PROVIDERS[name]
    return factory(cfg)


def byte_kind(name: str) -> str:
    return PROVIDERS[name][1]
