"""Drop-in modules: ``FusedAddNorm`` for ``nn.LayerNorm``, ``FusedAddRMSNorm`` for ``nn.RMSNorm``.

Constructor conventions, parameter names (``weight``, ``bias``), initialisation and
``state_dict`` keys match the torch modules, so checkpoints load either way.
``forward(x, residual=None)`` returns ``y``, or ``(y, residual_out)`` with ``prenorm``;
for inference, ``forward(..., out=, residual_out=)`` writes into buffers the caller
owns and ``forward_inplace(x, residual)`` updates both in place (vLLM's form).
"""

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional
from ._validation import canonical_normalized_shape, checked_eps, checked_weight_offset


_ABSENT = object()


class _FusedAddNormBase(nn.Module):
    _has_bias_option = False  # nn.LayerNorm has a ``bias`` option (and shows it); nn.RMSNorm not
    _eps_may_be_none = False  # nn.RMSNorm's eps=None means torch.finfo(x.dtype).eps

    def __init__(self, normalized_shape, eps, elementwise_affine, with_bias, prenorm,
                 residual_in_fp32, memory_efficient, weight_offset, device, dtype):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape = canonical_normalized_shape(normalized_shape)
        # Checked here, not at the first forward: a bad value fails where it was written.
        self.eps = (eps if eps is None and self._eps_may_be_none
                    else checked_eps(eps, f" of {type(self).__name__}"))
        self.elementwise_affine = elementwise_affine
        self.prenorm = prenorm
        self.residual_in_fp32 = residual_in_fp32
        self.memory_efficient = memory_efficient
        self.weight_offset = checked_weight_offset(
            weight_offset, True if elementwise_affine else None,
            f" of {type(self).__name__} (elementwise_affine={elementwise_affine})")
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if with_bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:  # the weight used, weight + weight_offset, starts at 1
            nn.init.constant_(self.weight, 1.0 - self.weight_offset)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _param(self, name: str):
        """``self.weight`` / ``self.bias``, read from the parameter table where it holds
        them (nn.Module's attribute fallback costs most of a microsecond a read); a
        parametrized one (torch.nn.utils.parametrize) through the attribute."""
        value = self._parameters.get(name, _ABSENT)
        return getattr(self, name) if value is _ABSENT else value

    @property
    def _residual_dtype(self) -> Optional[torch.dtype]:
        return torch.float32 if self.residual_in_fp32 else None

    def extra_repr(self) -> str:
        text = (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")
        if self._has_bias_option:
            text += f", bias={self.bias is not None}"
        for flag in ("prenorm", "residual_in_fp32", "memory_efficient"):
            if getattr(self, flag):
                text += f", {flag}=True"
        if self.weight_offset:
            text += f", weight_offset={self.weight_offset}"
        return text

    @staticmethod
    def _no_offset_when_copying(kwargs: dict, method: str, source: str) -> None:
        if kwargs.get("weight_offset", 0.0) != 0.0:
            raise ValueError(f"weight_offset: {method} copies a {source}, whose weight is used as it is; with "
                             f"weight_offset={kwargs['weight_offset']} the copy would use weight + "
                             f"{kwargs['weight_offset']}. Construct the module with weight_offset and load the "
                             f"checkpoint's raw weight instead")

    @staticmethod
    def _factory_of(norm: nn.Module) -> dict:
        weight = getattr(norm, "weight", None)
        if weight is None:
            return {}
        return {"device": weight.device, "dtype": weight.dtype}


class FusedAddNorm(_FusedAddNormBase):
    """``nn.LayerNorm`` applied to ``x + residual``, fused into one kernel.

    Args match ``nn.LayerNorm``; ``prenorm`` also returns the sum (the new residual
    stream), ``residual_in_fp32`` keeps that sum in fp32, and ``memory_efficient``
    saves the output instead of the sum for backward (the weight must stay nonzero).
    ``weight_offset`` makes the weight used ``weight + weight_offset`` (Gemma's
    ``1 + w`` is ``weight_offset=1``); the parameter stays the raw ``weight`` (what
    checkpoints hold) and starts at ``1 - weight_offset``.
    """

    _has_bias_option = True

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, prenorm: bool = False, residual_in_fp32: bool = False,
                 memory_efficient: bool = False, weight_offset: float = 0.0, device=None,
                 dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, prenorm,
                         residual_in_fp32, memory_efficient, weight_offset, device, dtype)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, *, out: Optional[Tensor] = None,
                residual_out: Optional[Tensor] = None):
        # functional.add_layer_norm's body, positionally: keyword binding costs a
        # microsecond at decode sizes
        return functional._add_norm(x, residual, self._param("weight"), self._param("bias"), self.eps, False,
                                    self.prenorm,
                                    self._residual_dtype, self.memory_efficient, self.normalized_shape,
                                    self.weight_offset, out, residual_out)

    def forward_inplace(self, x: Tensor, residual: Tensor):
        """Inference: ``residual += x``, then ``x = norm(residual)``, in place; returns
        ``(x, residual)`` (:func:`residual_fused.functional.add_layer_norm_`)."""
        return functional._add_norm_(x, residual, self._param("weight"), self._param("bias"), self.eps, False,
                                     self.normalized_shape, self.weight_offset, "add_layer_norm_")

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, **kwargs) -> "FusedAddNorm":
        """A ``FusedAddNorm`` with ``ln``'s shape, eps, affine/bias settings, device,
        dtype and (copied) parameters; ``kwargs`` set ``prenorm`` and the other flags."""
        cls._no_offset_when_copying(kwargs, "from_layer_norm", "nn.LayerNorm")
        module = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine,
                     bias=getattr(ln, "bias", None) is not None, **cls._factory_of(ln), **kwargs)
        module.load_state_dict(ln.state_dict())
        return module


class FusedAddRMSNorm(_FusedAddNormBase):
    """``nn.RMSNorm`` applied to ``x + residual``, fused into one kernel.

    Args match ``nn.RMSNorm`` (``eps=None`` means ``torch.finfo(x.dtype).eps``), plus
    the flags of :class:`FusedAddNorm`.
    """

    _eps_may_be_none = True

    def __init__(self, normalized_shape, eps: Optional[float] = None,
                 elementwise_affine: bool = True, *, prenorm: bool = False,
                 residual_in_fp32: bool = False, memory_efficient: bool = False,
                 weight_offset: float = 0.0, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, False, prenorm,
                         residual_in_fp32, memory_efficient, weight_offset, device, dtype)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, *, out: Optional[Tensor] = None,
                residual_out: Optional[Tensor] = None):
        return functional._add_norm(x, residual, self._param("weight"), None, self.eps, True, self.prenorm,
                                    self._residual_dtype, self.memory_efficient, self.normalized_shape,
                                    self.weight_offset, out, residual_out)

    def forward_inplace(self, x: Tensor, residual: Tensor):
        """Inference: ``residual += x``, then ``x = norm(residual)``, in place; returns
        ``(x, residual)`` (vLLM's ``fused_add_rms_norm``;
        :func:`residual_fused.functional.add_rms_norm_`)."""
        return functional._add_norm_(x, residual, self._param("weight"), None, self.eps, True,
                                     self.normalized_shape, self.weight_offset, "add_rms_norm_")

    @classmethod
    def from_rms_norm(cls, norm: nn.Module, **kwargs) -> "FusedAddRMSNorm":
        """A ``FusedAddRMSNorm`` with ``norm``'s shape, eps, affine setting, device,
        dtype and (copied) weight; ``kwargs`` set ``prenorm`` and the other flags."""
        cls._no_offset_when_copying(kwargs, "from_rms_norm", "nn.RMSNorm")
        module = cls(norm.normalized_shape, eps=norm.eps,
                     elementwise_affine=norm.elementwise_affine, **cls._factory_of(norm),
                     **kwargs)
        module.load_state_dict(norm.state_dict())
        return module
