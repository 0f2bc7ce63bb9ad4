"""The implementations a benchmark row compares, behind one interface.

A provider turns a :class:`byte_model.Config` into a function
``fn(x, residual, weight, bias) -> y | (y, residual_out)`` with the semantics of
``residual_fused.add_layer_norm`` / ``add_rms_norm`` for that config, or raises
:class:`Unavailable` with a one-line reason (not installed, or a feature the peer
lacks). Providers never install anything. Peers that have no fused residual add run
``x + residual`` in PyTorch first; their rows are charged the unfused byte count and
labelled ``add unfused``.
"""

import dataclasses
import importlib
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import residual_fused as rf
from bench.byte_model import Config

EPS = {"layer": 1e-5, "rms": 1e-6}


class Unavailable(Exception):
    """A provider cannot run this config here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Config], Callable]  # raises Unavailable
    fuses_add: Callable[[Config], bool]  # True: charged the fused byte count
    about: str


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken install raising anything else
        raise Unavailable(f"{what} is not importable ({type(err).__name__})") from None


def _norm_eager(cfg: Config, z, weight, bias):
    shape = (z.shape[-1],)
    if cfg.norm == "rms":
        return F.rms_norm(z, shape, weight, EPS["rms"])
    return F.layer_norm(z, shape, weight, bias, EPS["layer"])


def _eager(cfg: Config) -> Callable:
    def add_norm(x, residual, weight, bias):
        s = (x + residual).to(cfg.out_dtype)
        y = _norm_eager(cfg, s.to(weight.dtype), weight, bias).to(x.dtype)
        return (y, s) if cfg.prenorm else y

    return add_norm


def _compiled(cfg: Config) -> Callable:
    # Each config compiles its own closure of the same code object; start from a clean
    # cache so earlier configs do not count towards dynamo's recompile limit.
    torch._dynamo.reset()
    # The "bwd" rows replay one graph's backward (retain_graph=True), which a backward
    # compiled with donated buffers refuses; donation only saves memory, not time.
    functorch_config = getattr(getattr(torch, "_functorch", None), "config", None)
    if functorch_config is not None and hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    return torch.compile(_eager(cfg), fullgraph=True, dynamic=False)


def _ours(cfg: Config) -> Callable:
    kwargs = dict(prenorm=cfg.prenorm, residual_dtype=cfg.residual_out_dtype,
                  memory_efficient=cfg.memory_efficient)
    if cfg.norm == "rms":
        return lambda x, r, w, b: rf.add_rms_norm(x, r, w, EPS["rms"], **kwargs)
    return lambda x, r, w, b: rf.add_layer_norm(x, r, w, b, EPS["layer"], **kwargs)


def _no_memory_efficient(cfg: Config, who: str) -> None:
    if cfg.memory_efficient:
        raise Unavailable(f"{who} has no memory-efficient mode")


def _unfused_add(cfg: Config, norm: Callable) -> Callable:
    """``x + residual`` in PyTorch, then a peer's norm ``norm(z, weight, bias)``."""
    def add_norm(x, residual, weight, bias):
        s = (x + residual).to(cfg.out_dtype)
        y = norm(s.to(x.dtype), weight, bias).to(x.dtype)
        return (y, s) if cfg.prenorm else y

    return add_norm


def _flash_attn(cfg: Config) -> Callable:
    _no_memory_efficient(cfg, "flash-attn's layer_norm_fn")
    mod = _import("flash_attn.ops.triton.layer_norm", "flash_attn")
    if cfg.residual_out_dtype not in (None, cfg.residual_dtype, torch.float32):
        raise Unavailable("flash-attn keeps residual_out in the residual's dtype or fp32 only")
    fp32_stream = cfg.out_dtype == torch.float32

    def add_norm(x, residual, weight, bias):
        return mod.layer_norm_fn(x, weight, None if cfg.norm == "rms" else bias,
                                 residual=residual, eps=EPS[cfg.norm], prenorm=cfg.prenorm,
                                 residual_in_fp32=fp32_stream, is_rms_norm=cfg.norm == "rms")

    return add_norm


def _with_weight(module, weight, bias):
    """Point a peer's norm module at the benchmark's weight/bias tensors (so their
    gradients are the ones timed) without copying."""
    for name, value in (("weight", weight), ("bias", bias)):
        if hasattr(module, name) and getattr(module, name) is not None:
            delattr(module, name)
            setattr(module, name, value)
    return module


def _liger(cfg: Config) -> Callable:
    _no_memory_efficient(cfg, "Liger")
    if cfg.norm == "rms":
        try:
            fused = importlib.import_module("liger_kernel.transformers.fused_add_rms_norm")
        except Exception:
            fused = None
        if fused is not None and cfg.x_dtype == cfg.residual_dtype == cfg.out_dtype:
            module = fused.LigerFusedAddRMSNorm(cfg.hidden, eps=EPS["rms"]).to("cuda")

            def add_norm(x, residual, weight, bias):
                y, s = _with_weight(module, weight, None)(x, residual)
                return (y, s) if cfg.prenorm else y

            return add_norm
        mod = _import("liger_kernel.transformers.rms_norm", "liger_kernel")
        module = mod.LigerRMSNorm(cfg.hidden, eps=EPS["rms"]).to("cuda")
        return _unfused_add(cfg, lambda z, w, b: _with_weight(module, w, None)(z))
    mod = _import("liger_kernel.transformers.layer_norm", "liger_kernel")
    module = mod.LigerLayerNorm(cfg.hidden, eps=EPS["layer"]).to("cuda")
    return _unfused_add(cfg, lambda z, w, b: _with_weight(module, w, b)(z))


def _liger_fuses(cfg: Config) -> bool:
    return cfg.norm == "rms" and cfg.x_dtype == cfg.residual_dtype == cfg.out_dtype


def _apex(cfg: Config) -> Callable:
    mod = _import("apex.normalization.fused_layer_norm", "apex")
    shape = (cfg.hidden,)
    mem = cfg.memory_efficient
    if cfg.norm == "rms":
        return _unfused_add(cfg, lambda z, w, b: mod.fused_rms_norm_affine(
            z, w, shape, EPS["rms"], memory_efficient=mem))
    return _unfused_add(cfg, lambda z, w, b: mod.fused_layer_norm_affine(
        z, w, b, shape, EPS["layer"], memory_efficient=mem))


def _quack(cfg: Config) -> Callable:
    _no_memory_efficient(cfg, "QuACK")
    if cfg.norm != "rms":
        raise Unavailable("QuACK has no LayerNorm with a residual")
    mod = _import("quack.rmsnorm", "quack")

    def add_norm(x, residual, weight, bias):
        return mod.rmsnorm(x, weight, residual=residual, residual_dtype=cfg.out_dtype,
                           eps=EPS["rms"], prenorm=cfg.prenorm)

    return add_norm


def _transformer_engine(cfg: Config) -> Callable:
    _no_memory_efficient(cfg, "TransformerEngine")
    te = _import("transformer_engine.pytorch", "transformer_engine")
    cls = te.RMSNorm if cfg.norm == "rms" else te.LayerNorm
    module = cls(cfg.hidden, eps=EPS[cfg.norm], params_dtype=cfg.weight_dtype)
    return _unfused_add(cfg, lambda z, w, b: _with_weight(module, w, b)(z))


PROVIDERS: Dict[str, Provider] = {p.name: p for p in (
    Provider("eager", _eager, lambda cfg: False, "x + r, then F.layer_norm / F.rms_norm"),
    Provider("compile", _compiled, lambda cfg: True, "torch.compile of the eager function"),
    Provider("residual_fused", _ours, lambda cfg: True, "this library"),
    Provider("flash_attn", _flash_attn, lambda cfg: True, "flash-attn Triton layer_norm_fn"),
    Provider("liger", _liger, _liger_fuses, "Liger-Kernel (fused add for RMSNorm)"),
    Provider("apex", _apex, lambda cfg: False, "Apex FusedLayerNorm / FusedRMSNorm, add unfused"),
    Provider("quack", _quack, lambda cfg: True, "QuACK rmsnorm with residual"),
    Provider("transformer_engine", _transformer_engine, lambda cfg: False,
             "TransformerEngine LayerNorm / RMSNorm, add unfused"),
)}

#: Peers run only on CUDA; the first three run anywhere.
CPU_PROVIDERS = ("eager", "compile", "residual_fused")


def make(name: str, cfg: Config, device: str) -> Callable:
    if name not in CPU_PROVIDERS and not device.startswith("cuda"):
        raise Unavailable(f"{name} runs on CUDA only")
    return PROVIDERS[name].build(cfg)


def fuses_add(name: str, cfg: Config) -> bool:
    return PROVIDERS[name].fuses_add(cfg)
