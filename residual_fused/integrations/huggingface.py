"""Convert Hugging Face ``transformers`` models to the fused Add & Norm, in place.

* :func:`convert_bert_model`: post-norm. Every ``BertSelfOutput`` / ``BertOutput``
  (``LayerNorm(dropout(dense(h)) + input)``) gets a :class:`FusedAddNorm`.
* :func:`convert_llama_model`: pre-norm. In every ``LlamaDecoderLayer`` the
  attention's residual add is fused into ``post_attention_layernorm`` (the pre-norm
  form returns the new residual stream). The MLP's residual add stays in PyTorch:
  fusing it into the next layer's norm would need the model's layer loop to pass
  ``(hidden, residual)`` pairs between layers.

Parameter objects are reused, not copied, and attribute names are kept, so the
``state_dict`` keys do not change: checkpoints load both ways and an optimizer made
before the conversion still updates the right tensors. Each conversion checks the
``transformers`` version it was written for and refuses others with a clear error.
"""

import functools
import re

from torch import nn

from ..modules import FusedAddNorm, FusedAddRMSNorm
from ..support import TRANSFORMERS_RANGES

#: transformers versions each conversion was written and tested for: [low, high).
SUPPORTED_VERSIONS = TRANSFORMERS_RANGES


def _installed_version() -> str:
    import transformers

    return transformers.__version__


def _check_version(family: str) -> None:
    version = _installed_version()
    found = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    low, high = SUPPORTED_VERSIONS[family]
    if not low <= found < high:
        raise RuntimeError(
            f"convert_{family}_model was written for transformers >= {'.'.join(map(str, low))}, "
            f"< {'.'.join(map(str, high))}; the installed version is {version}. "
            f"Its {family} modules may differ, so the conversion is refused rather than guessed")


def _share_parameters(fused: nn.Module, original: nn.Module) -> nn.Module:
    for name in ("weight", "bias"):
        param = getattr(original, name, None)
        if param is not None:
            setattr(fused, name, param)
    return fused


@functools.lru_cache(maxsize=None)
def _subclass(cls: type, forward) -> type:
    """``cls`` with its forward replaced; the module's state and name stay the same."""
    return type(f"Fused{cls.__name__}", (cls,), {"forward": forward})


def _bert_output_forward(self, hidden_states, input_tensor):
    return self.LayerNorm(self.dropout(self.dense(hidden_states)), input_tensor)


def convert_bert_model(model: nn.Module, *, memory_efficient: bool = False) -> nn.Module:
    """Fuse the two Add & Norm sites of every BERT layer (attention output and
    feed-forward output) into :class:`FusedAddNorm`. Returns ``model``."""
    _check_version("bert")
    from transformers.models.bert import modeling_bert

    targets = (modeling_bert.BertSelfOutput, modeling_bert.BertOutput)
    converted = 0
    for module in model.modules():
        if type(module) in targets:
            ln = module.LayerNorm
            fused = FusedAddNorm(ln.normalized_shape, eps=ln.eps,
                                 elementwise_affine=ln.elementwise_affine,
                                 bias=ln.bias is not None, memory_efficient=memory_efficient,
                                 device=ln.weight.device, dtype=ln.weight.dtype)
            module.LayerNorm = _share_parameters(fused, ln)
            module.__class__ = _subclass(type(module), _bert_output_forward)
            converted += 1
    if converted == 0:
        raise ValueError("model: no BertSelfOutput or BertOutput modules found to convert")
    return model


def _llama_layer_forward(self, hidden_states, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    attn = self.self_attn(hidden_states=hidden_states, **kwargs)
    attn = attn[0] if isinstance(attn, tuple) else attn
    # residual = residual + attn, normalized in the same kernel
    hidden_states, residual = self.post_attention_layernorm(attn, residual)
    return residual + self.mlp(hidden_states)


def _fused_rms_norm(norm: nn.Module, prenorm: bool, memory_efficient: bool) -> FusedAddRMSNorm:
    weight = norm.weight
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    fused = FusedAddRMSNorm(weight.shape, eps=eps, prenorm=prenorm,
                            memory_efficient=memory_efficient, device=weight.device,
                            dtype=weight.dtype)
    return _share_parameters(fused, norm)


def convert_llama_model(model: nn.Module, *, memory_efficient: bool = False) -> nn.Module:
    """Fuse each Llama decoder layer's attention residual add into its
    ``post_attention_layernorm`` (pre-norm form); ``input_layernorm`` runs on the
    same kernels without a residual. Returns ``model``."""
    _check_version("llama")
    from transformers.models.llama import modeling_llama

    converted = 0
    for module in model.modules():
        if type(module) is modeling_llama.LlamaDecoderLayer:
            module.input_layernorm = _fused_rms_norm(module.input_layernorm, False, memory_efficient)
            module.post_attention_layernorm = _fused_rms_norm(
                module.post_attention_layernorm, True, memory_efficient)
            module.__class__ = _subclass(type(module), _llama_layer_forward)
            converted += 1
    if converted == 0:
        raise ValueError("model: no LlamaDecoderLayer modules found to convert")
    return model
