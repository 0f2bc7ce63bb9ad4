"""Convert Hugging Face ``transformers`` models to the fused Add & Norm, in place.

:func:`apply` dispatches on ``model.config.model_type`` and returns a
:class:`ConversionReport`; the per-family functions do the same for one family.

* **Pre-norm decoders** (Llama and the families built like it, :data:`DECODERS`):
  every residual add is fused. In a layer, the attention's add is fused into
  ``post_attention_layernorm``; the MLP's add is not done by the layer at all: the
  layer returns the pair ``(mlp_output, residual)`` and the next layer's
  ``input_layernorm`` (or, after the last layer, the model's final ``norm``) adds
  them in its own fused call, as inference engines do in their model code. That
  is ``2 L`` adds in ``2 L + 1`` kernel calls for ``L`` layers. QK-norms
  (``q_norm``/``k_norm``) run on the kernel without a residual.
  Families whose attention and MLP read the same input (GPT-NeoX's parallel
  residual, Falcon's parallel attention) sum the two branches in PyTorch and fuse
  ``x +`` that sum.
* **Encoder-decoders** (:data:`STACKS`: Whisper, T5): the same in each stack.
* **Post-norm encoders** (BERT, RoBERTa, DistilBERT): every ``norm(sublayer + input)``
  becomes one fused call.
* **Norms only** (:data:`NORMS_ONLY`, OLMo2, whose norms come before its adds):
  norms on the kernel, the adds reported.

What a converted pre-norm layer returns: a :class:`ResidualPair`, which only travels
between converted layers and the final norm (its forward returns a plain tuple, so
that reentrant checkpointing tracks both tensors; the layer's call wraps it). It
returns the summed hidden state instead (the add in PyTorch for that call) wherever
a pair could be misread or could not travel: while the model collects
``output_hidden_states`` (so they are the unconverted model's), when forward hooks or
pre-hooks other than transformers' own watch the layer (they see hidden states,
before and after), and under reentrant activation checkpointing (whose recompute
must return what the forward returned). A converted layer called on its own returns
a pair; ``pair.hidden_state()`` is its hidden state, and indexing it is an error.

Parameter objects are reused, not copied, and attribute names are kept, so the
``state_dict`` keys do not change: checkpoints load both ways, ``save_pretrained``
writes a checkpoint the unconverted model loads, and an optimizer made before the
conversion still updates the right tensors. Each family checks the ``transformers``
version it was written for and refuses others with a clear error.
"""

import dataclasses
import functools
import importlib
import re
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import functional
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
            f"the {family} conversion was written for transformers >= {'.'.join(map(str, low))}, "
            f"< {'.'.join(map(str, high))}; the installed version is {version}. "
            f"Its {family} modules may differ, so the conversion is refused rather than guessed")


# ---- the report -----------------------------------------------------------------------

@dataclasses.dataclass
class ConversionReport:
    """What a conversion did: residual adds fused into a norm's kernel call, norms
    that run on the kernel (with or without a residual), and modules left alone."""
    model_type: str
    fused_adds: int = 0
    norms_on_kernel: int = 0
    norms_without_residual: int = 0
    layers: int = 0
    left_alone: List[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"residual_fused conversion of {self.model_type}: {self.layers} layers, "
                 f"{self.fused_adds} residual adds fused, {self.norms_on_kernel} norms on the kernel "
                 f"({self.norms_without_residual} of them without a residual)"]
        lines += [f"  left alone: {name}" for name in self.left_alone]
        return "\n".join(lines)


# ---- norms on the kernel ----------------------------------------------------------------

class ResidualPair:
    """What a converted pre-norm layer hands to the next one: its last sublayer's
    output (``branch``) and the residual stream before that add. The hidden state is
    their sum, which the next layer's input norm (or the final norm) computes in its
    fused call. Deliberately neither a tensor nor a tuple: code that indexes a layer's
    output (``out[0]``) or uses it as the hidden state fails at once instead of
    reading the branch alone; :meth:`hidden_state` gives the sum."""

    __slots__ = ("branch", "residual")

    def __init__(self, branch, residual):
        self.branch, self.residual = branch, residual

    def hidden_state(self):
        return self.residual + self.branch

    def __repr__(self) -> str:
        return (f"ResidualPair(branch, residual: {tuple(self.branch.shape)}; the hidden state is "
                f".hidden_state())")


def _unpair(x, residual):
    if isinstance(x, ResidualPair):  # from a converted layer: the add is fused here
        if residual is not None:
            raise TypeError("a converted norm takes a tensor, or one ResidualPair without a residual")
        return x.branch, x.residual
    return x, residual


class KernelRMSNorm(FusedAddRMSNorm):
    """A model's RMSNorm on the kernel. ``forward(x)`` normalizes ``x``;
    ``forward((branch, residual))`` normalizes their sum in one call (the final norm
    after a converted decoder layer)."""

    def forward(self, x, residual=None):
        return super().forward(*_unpair(x, residual))


class KernelLayerNorm(FusedAddNorm):
    """A model's LayerNorm on the kernel; ``forward`` as :class:`KernelRMSNorm`'s."""

    def forward(self, x, residual=None):
        return super().forward(*_unpair(x, residual))


class T5KernelRMSNorm(KernelRMSNorm):
    """T5's RMSNorm on the kernel, with its output dtype: the weight's when that is
    16-bit, else fp32 (T5 keeps some layers in fp32 when loaded in fp16, so the
    residual stream and the norm's weight can differ in dtype). A pair's add is fused
    where the branch, the residual and the weight share a dtype other than fp16, and
    done in PyTorch first otherwise."""

    def fuses(self, x, residual) -> bool:
        """Whether the add of ``x`` and ``residual`` runs in this norm's kernel call."""
        return x.dtype == residual.dtype == self.weight.dtype != torch.float16

    def add_norm(self, x, residual):
        """(norm(x + residual), x + residual); the residual None: (norm(x), x)."""
        if residual is None:
            return self(x), x
        if self.fuses(x, residual):
            return _add_norm(self, x, residual)
        total = residual + x
        return self(total), total

    def forward(self, x, residual=None):
        x, residual = _unpair(x, residual)
        if residual is not None:  # the stack's final norm after a converted block
            if self.fuses(x, residual):
                return super().forward(x, residual)
            x = residual + x
        w = self.weight.dtype
        out = w if w in (torch.float16, torch.bfloat16) else torch.promote_types(w, torch.float32)
        if torch.finfo(out).bits > torch.finfo(x.dtype).bits:  # normalize in the wider dtype
            x = x.to(out)
        return super().forward(x).to(out)


def _check_replaceable(module: nn.Module, where: str, replaced: bool = True) -> None:
    """A module whose forward was wrapped per instance (as accelerate's device_map
    dispatch does) would be called wrongly once its class changes, and a module that is
    replaced (a norm) would lose its hooks: refuse, naming it. (A converted layer keeps
    its hooks: it is the same object.)"""
    hooked = replaced and bool(module._forward_hooks or module._forward_pre_hooks)
    if "forward" in module.__dict__ or hasattr(module, "_hf_hook") or hooked:
        raise ValueError(f"model: {where} has {'hooks or ' if replaced else ''}a per-instance forward (as "
                         f"accelerate's device_map dispatch installs); convert the model with apply() before "
                         f"dispatching it{' or registering hooks on it' if replaced else ''}")


def _share_parameters(fused: nn.Module, original: nn.Module) -> nn.Module:
    for name in ("weight", "bias"):
        param = getattr(original, name, None)
        if param is not None:
            setattr(fused, name, param)
    return fused


def _kernel_norm(norm: nn.Module, weight_offset: float = 0.0, rms_class: type = KernelRMSNorm,
                 memory_efficient: bool = False, where: str = "") -> nn.Module:
    """`norm` (an nn.LayerNorm, or a model's RMSNorm as `rms_class`) on the kernel,
    sharing its parameters; `where` names it in an error."""
    _check_replaceable(norm, where or type(norm).__name__)
    weight = norm.weight
    factory = dict(weight_offset=weight_offset, memory_efficient=memory_efficient, device=weight.device,
                   dtype=weight.dtype)
    if isinstance(norm, nn.LayerNorm):
        fused = KernelLayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                                bias=norm.bias is not None, **factory)
    else:
        fused = rms_class(weight.shape, eps=getattr(norm, "variance_epsilon", getattr(norm, "eps", None)),
                          **factory)
    return _share_parameters(fused, norm)


def _input_norm(norm: nn.Module, hidden_states, residual):
    """A layer's first norm: of the hidden state alone (the first layer, or after a
    layer that returned a hidden state), or of the previous layer's pair, its last add
    fused here. Returns (normalized, residual stream)."""
    if residual is None:
        return norm(hidden_states), hidden_states
    return _add_norm(norm, hidden_states, residual)


def _add_norm(norm: nn.Module, x, residual):
    """(norm(x + residual), x + residual) in one fused call with `norm`'s parameters."""
    if isinstance(norm, FusedAddRMSNorm):
        return functional.add_rms_norm(x, residual, norm.weight, norm.eps, prenorm=True,
                                       normalized_shape=norm.normalized_shape,
                                       weight_offset=norm.weight_offset)
    return functional.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, prenorm=True,
                                     normalized_shape=norm.normalized_shape,
                                     weight_offset=norm.weight_offset)


# ---- classes made by the conversion --------------------------------------------------------

_MADE: Dict[str, type] = {}


def _made_class(family: str, cls: type, members: dict) -> type:
    """``cls`` with ``members`` replaced, named so that pickle finds it again in a
    fresh process (module ``__getattr__`` below rebuilds it from the name)."""
    name = f"Fused_{family}_{cls.__name__}"
    made = _MADE.get(name)
    if made is None:
        made = type(name, (cls,), dict(members, __module__=__name__, __qualname__=name))
        _MADE[name] = made
    return made


def __getattr__(name: str):
    # pickle looks converted classes up by name: build the family's classes first
    for family, build in _FAMILY_CLASSES.items():
        if name not in _MADE and name.startswith(f"Fused_{family}_"):
            build()
    if name in _MADE:
        return _MADE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- pre-norm decoders ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Decoder:
    """A pre-norm decoder family built like Llama: ``transformers.models.<package>``
    with ``<prefix>Model`` (``layers``, ``norm``) and ``<prefix>DecoderLayer``
    (``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``).

    ``sandwich``: Gemma 2/3's layer, where ``post_attention_layernorm`` and
    ``post_feedforward_layernorm`` normalize each sublayer's output before its add
    (on the kernel, without a residual) and ``pre_feedforward_layernorm`` is the MLP's
    input norm (the attention's add is fused into it)."""
    package: str
    prefix: str
    branch: str = "plain"    # what the layer does to a sublayer's output before its add
    qk_norm: bool = False    # self_attn has q_norm / k_norm (RMSNorm over the head dim)
    weight_offset: float = 0.0  # the norms use weight + weight_offset (Gemma: 1 + w)
    sandwich: bool = False
    model_class: str = ""    # when not <prefix>Model
    # "llama"; "gpt2": GPT-2's block (ln_1, attn, [ln_cross_attn, crossattention], ln_2,
    # mlp; nn.LayerNorm; the model's h and ln_f); "vit": ViT's layer (layernorm_before,
    # attention, layernorm_after, mlp, each output through dropout; the model's layernorm).
    # gpt2 and vit loops pass arguments positionally. "neox": GPT-NeoX's layer, whose
    # parallel residual adds both sublayers to the same input (x + attn(ln1(x)) +
    # mlp(ln2(x))): attn + mlp stays a PyTorch add, its sum with x is fused into the
    # next input norm, and ln2 normalizes the new residual without one.
    # "whisper_encoder" / "whisper_decoder": Whisper's layers (self_attn_layer_norm,
    # [encoder_attn_layer_norm,] final_layer_norm; the stack's layer_norm).
    # "falcon": Falcon's layer in its three shapes (sequential; parallel attention with
    # one norm; the new architecture's ln_attn and ln_mlp, both of x); the model's h and
    # ln_f; the layer returns (hidden, attn_weights). "t5": T5's block of sublayers
    # (layer[0] self-attention, [layer[1] cross-attention,] layer[-1] feed-forward, each
    # with its layer_norm); the stack's block and final_layer_norm; the block returns
    # (hidden, self-attention bias, cross-attention bias).
    style: str = "llama"
    layer_class: str = ""    # when not <prefix> + the style's layer name

    def classes(self) -> Tuple[type, type]:
        module = importlib.import_module(f"transformers.models.{self.package}.modeling_{self.package}")
        layer = {"gpt2": "Block", "vit": "Layer", "neox": "Layer", "t5": "Block"}.get(self.style, "DecoderLayer")
        return (getattr(module, self.model_class or f"{self.prefix}Model"),
                getattr(module, self.layer_class or self.prefix + layer))

    def norm_slots(self, layer: nn.Module) -> List[Tuple[nn.Module, str]]:
        """(parent, attribute) of every norm of ``layer`` (QK-norms included)."""
        if self.style == "t5":
            return [(sub, "layer_norm") for sub in layer.layer]
        slots = [(layer, name) for name in self.norm_names() if getattr(layer, name, None) is not None]
        if self.qk_norm:
            attn = getattr(layer, self.attention)
            slots += [(attn, name) for name in ("q_norm", "k_norm") if getattr(attn, name, None) is not None]
        return slots

    def counts(self, layer: nn.Module) -> Tuple[int, int]:
        """(residual adds ``layer`` fuses, its norms that run without a residual)."""
        if self.style == "t5":
            return len(layer.layer), 0
        adds = 3 if self.style == "whisper_decoder" or (self.style == "gpt2" and hasattr(layer, "crossattention")) \
            else 2
        alone = (2 if self.qk_norm else 0) + (2 if self.sandwich else 0)
        if _parallel(self, layer):  # one residual add; a second norm of x (GPT-NeoX's ln2, Falcon's ln_mlp)
            second = self.style == "neox" or getattr(layer, "ln_mlp", None) is not None
            return 1, alone + int(second)
        return adds, alone

    @property
    def extra_outputs(self) -> int:
        """How many outputs the family's layer returns after the hidden state."""
        return {"falcon": 1, "t5": 2}.get(self.style, 0)

    def norm_names(self) -> Tuple[str, ...]:
        if self.style == "falcon":
            return ("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp")
        if self.style == "gpt2":
            return ("ln_1", "ln_cross_attn", "ln_2")
        if self.style == "vit":
            return ("layernorm_before", "layernorm_after")
        if self.style == "whisper_encoder":
            return ("self_attn_layer_norm", "final_layer_norm")
        if self.style == "whisper_decoder":
            return ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
        extra = ("pre_feedforward_layernorm", "post_feedforward_layernorm") if self.sandwich else ()
        return ("input_layernorm", "post_attention_layernorm") + extra

    @property
    def layers(self) -> str:
        return {"gpt2": "h", "falcon": "h", "t5": "block"}.get(self.style, "layers")

    @property
    def final_norm(self) -> str:
        return {"gpt2": "ln_f", "falcon": "ln_f", "vit": "layernorm", "neox": "final_layer_norm",
                "t5": "final_layer_norm", "whisper_encoder": "layer_norm",
                "whisper_decoder": "layer_norm"}.get(self.style, "norm")

    @property
    def attention(self) -> str:
        return {"gpt2": "attn", "vit": "attention", "neox": "attention"}.get(self.style, "self_attn")


def _parallel(spec: Decoder, layer: nn.Module) -> bool:
    """True for a layer whose attention and MLP both read the same input and whose
    outputs are summed before the one residual add (GPT-NeoX's parallel residual;
    Falcon's parallel attention and new architecture)."""
    if spec.style == "neox":
        return bool(layer.use_parallel_residual)
    if spec.style == "falcon":
        return bool(layer.config.new_decoder_architecture or layer.config.parallel_attn)
    return False


#: model_type -> family, for every pre-norm decoder :func:`apply` fuses.
DECODERS = {
    "llama": Decoder("llama", "Llama"),
    "mistral": Decoder("mistral", "Mistral"),
    "mixtral": Decoder("mixtral", "Mixtral"),
    "qwen2": Decoder("qwen2", "Qwen2"),
    "qwen2_moe": Decoder("qwen2_moe", "Qwen2Moe"),
    "qwen3": Decoder("qwen3", "Qwen3", qk_norm=True),
    "qwen3_moe": Decoder("qwen3_moe", "Qwen3Moe", qk_norm=True),
    "granite": Decoder("granite", "Granite", branch="multiplier"),
    "phi3": Decoder("phi3", "Phi3", branch="dropout"),
    "gemma": Decoder("gemma", "Gemma", weight_offset=1.0),
    "gemma2": Decoder("gemma2", "Gemma2", weight_offset=1.0, sandwich=True),
    "gemma3_text": Decoder("gemma3", "Gemma3", weight_offset=1.0, sandwich=True, qk_norm=True,
                           model_class="Gemma3TextModel"),
    "gpt2": Decoder("gpt2", "GPT2", style="gpt2"),
    "vit": Decoder("vit", "ViT", style="vit"),
    "gpt_neox": Decoder("gpt_neox", "GPTNeoX", style="neox"),
    "falcon": Decoder("falcon", "Falcon", style="falcon"),
}

#: The two stacks of an encoder-decoder family, converted together by its model_type
#: (these keys name the converted classes; they are not model types).
STACKS = {
    "whisper": ("whisper_encoder", "whisper_decoder"),
    "t5": ("t5",),  # T5Stack: the encoder and the decoder are instances of one class
}
_STACK_SPECS = {
    "whisper_encoder": Decoder("whisper", "Whisper", style="whisper_encoder", model_class="WhisperEncoder",
                               layer_class="WhisperEncoderLayer"),
    "whisper_decoder": Decoder("whisper", "Whisper", style="whisper_decoder", model_class="WhisperDecoder",
                               layer_class="WhisperDecoderLayer"),
    "t5": Decoder("t5", "T5", style="t5", model_class="T5Stack"),
}
_SPECS = {**DECODERS, **_STACK_SPECS}


def _branch(layer, spec: Decoder, out, which: str):
    """A sublayer's output as the family adds it to the residual stream."""
    if spec.branch == "multiplier":
        return out * layer.residual_multiplier
    if spec.branch == "dropout":
        return (layer.resid_attn_dropout if which == "attn" else layer.resid_mlp_dropout)(out)
    return out


def _observed(module: nn.Module) -> bool:
    """True when hooks other than transformers' own output capturing watch ``module``
    (or every module): they must see hidden states, not pairs."""
    from torch.nn.modules import module as torch_module

    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    if any(getattr(h, "__name__", "") != "output_capturing_hook" for h in hooks):
        return True
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _reentrant_checkpointing(layer: nn.Module) -> bool:
    """True when ``layer`` may run under reentrant activation checkpointing. Its
    recompute (in backward, with grad enabled and no output collector active) must
    return what the forward returned (inside the checkpoint, where grad is disabled),
    so the answer depends on the layer's settings alone, never on the grad mode: such
    a layer returns hidden states in both runs (and also when called under no_grad in
    training mode, where it is not checkpointed)."""
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training):
        return False
    keywords = getattr(getattr(layer, "_gradient_checkpointing_func", None), "keywords", None) or {}
    return keywords.get("use_reentrant", True) is not False  # torch's default when unset


def _layer_output(layer: nn.Module, out, residual, hidden_state: Optional[bool], branch_first: bool = False):
    """A converted layer's result: the (branch, residual) pair for the next fused call,
    or, where ``hidden_state`` (decided by the layer's call, else here; see
    :func:`_returns_hidden_state`), the hidden state: the add in PyTorch, in the
    family's own order."""
    if _returns_hidden_state(layer) if hidden_state is None else hidden_state:
        return out + residual if branch_first else residual + out
    return out, residual


def _returns_hidden_state(layer: nn.Module, observed: Optional[bool] = None) -> bool:
    """Whether ``layer`` must return its hidden state rather than a pair: when hooks
    watch the layer (``observed``, if the caller already knows), while the model
    collects hidden states, and under reentrant checkpointing."""
    if _observed(layer) if observed is None else observed:
        return True
    return _recording_hidden_states(layer) or _reentrant_checkpointing(layer)


def _recording_hidden_states(layer: nn.Module) -> bool:
    """True while the model collects its layers' outputs (output_hidden_states) from
    what they return. Falcon's model collects them in its own loop and a hook on it
    turns the pairs into hidden states, so its layers never need to."""
    if _SPECS[layer._residual_fused_family].style == "falcon":
        return False
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # cannot tell: never hand a pair to an observer
        return True
    if torch.compiler.is_compiling() and not getattr(_active_collector, "compiling", True):
        # No collector was set inside this compiled code, but one may be active outside
        # it (each layer compiled on its own), and dynamo cannot read the ContextVar:
        # the safe answer. (A layer compiled with layer.compile() is called from
        # uncompiled code, which decides; see _decoder_layer_call.)
        return True
    collected = _active_collector.get()
    return collected is not None and "hidden_states" in collected


def _decoder_layer_forward(self, hidden_states, residual=None, *, _return_hidden_state=None, **kwargs):
    spec = _SPECS[self._residual_fused_family]
    hidden_states, residual = _input_norm(self.input_layernorm, hidden_states, residual)
    attn = self.self_attn(hidden_states=hidden_states, **kwargs)
    attn = _branch(self, spec, attn[0] if isinstance(attn, tuple) else attn, "attn")
    if spec.sandwich:  # norm(attn) + residual, fused with the MLP's input norm
        hidden_states, residual = _add_norm(self.pre_feedforward_layernorm,
                                            self.post_attention_layernorm(attn), residual)
    else:
        hidden_states, residual = _add_norm(self.post_attention_layernorm, attn, residual)
    out = self.mlp(hidden_states)
    out = _branch(self, spec, out[0] if isinstance(out, tuple) else out, "mlp")
    if spec.sandwich:
        out = self.post_feedforward_layernorm(out)
    return _layer_output(self, out, residual, _return_hidden_state)


def _gpt2_block_forward(self, hidden_states, residual=None, cache=None, attention_mask=None,
                        encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False, *,
                        _return_hidden_state=None, **kwargs):
    hidden_states, residual = _input_norm(self.ln_1, hidden_states, residual)
    attn, _ = self.attn(hidden_states, cache=cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
    if encoder_hidden_states is not None:
        if not hasattr(self, "crossattention"):
            raise ValueError(f"If `encoder_hidden_states` are passed, {self} has to be instantiated with "
                             "cross-attention layers by setting `config.add_cross_attention=True`")
        hidden_states, residual = _add_norm(self.ln_cross_attn, attn, residual)
        attn, _ = self.crossattention(hidden_states, cache=cache, attention_mask=attention_mask,
                                      encoder_hidden_states=encoder_hidden_states,
                                      encoder_attention_mask=encoder_attention_mask)
    hidden_states, residual = _add_norm(self.ln_2, attn, residual)
    out = self.mlp(hidden_states)
    return _layer_output(self, out, residual, _return_hidden_state)


def _vit_layer_forward(self, hidden_states, residual=None, attention_mask=None, *, _return_hidden_state=None,
                       **kwargs):
    hidden_states, residual = _input_norm(self.layernorm_before, hidden_states, residual)
    attn, _ = self.attention(hidden_states, attention_mask, **kwargs)
    hidden_states, residual = _add_norm(self.layernorm_after, self.dropout(attn), residual)
    out = self.dropout(self.mlp(hidden_states))
    return _layer_output(self, out, residual, _return_hidden_state)


def _neox_layer_forward(self, hidden_states, residual=None, *, _return_hidden_state=None, **kwargs):
    hidden_states, residual = _input_norm(self.input_layernorm, hidden_states, residual)
    attn, _ = self.attention(hidden_states, **kwargs)
    attn = self.post_attention_dropout(attn)
    if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x)), as (mlp + attn) + x
        out = self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(residual))) + attn
    else:
        hidden_states, residual = _add_norm(self.post_attention_layernorm, attn, residual)
        out = self.post_mlp_dropout(self.mlp(hidden_states))
    return _layer_output(self, out, residual, _return_hidden_state, branch_first=True)


def _falcon_layer_forward(self, hidden_states, residual=None, attention_mask=None, position_ids=None,
                          layer_past=None, use_cache=False, output_attentions=False, position_embeddings=None,
                          *, _return_hidden_state=None, **kwargs):
    config = self.config
    two_norms = config.new_decoder_architecture and config.num_ln_in_parallel_attn == 2
    hidden_states, residual = _input_norm(self.ln_attn if two_norms else self.input_layernorm,
                                          hidden_states, residual)
    mlp_input = self.ln_mlp(residual) if two_norms else hidden_states
    attn, attn_weights = self.self_attention(hidden_states, layer_past=layer_past, attention_mask=attention_mask,
                                             position_ids=position_ids, use_cache=use_cache,
                                             output_attentions=output_attentions,
                                             position_embeddings=position_embeddings)
    parallel = _parallel(_SPECS["falcon"], self)
    if not parallel:  # residual + dropout(attn), fused with the MLP's norm
        attn = nn.functional.dropout(attn, p=config.attention_dropout, training=self.training)
        mlp_input, residual = _add_norm(self.post_attention_layernorm, attn, residual)
    out = self.mlp(mlp_input)
    if parallel:  # mlp + attn: the branch of the one residual add
        out = out + attn
    out = nn.functional.dropout(out, p=config.hidden_dropout, training=self.training)
    return _with_extras(_layer_output(self, out, residual, _return_hidden_state), attn_weights)


def _with_extras(out, *extras):
    """A layer's flat result: (branch, residual, *extras) or (hidden, *extras). Flat,
    so that reentrant checkpointing tracks every tensor; the layer's call regroups it."""
    return (*out, *extras) if isinstance(out, tuple) else (out, *extras)


# T5: the block hands (branch, residual) from sublayer to sublayer; each sublayer's
# layer_norm adds them in its fused call (T5KernelRMSNorm.add_norm). In fp16 T5 clamps
# every sum before the next norm, so there (and where a norm's weight differs in dtype
# from the hidden states, whose output dtype T5 sets apart) the add stays in PyTorch.

def _t5_clamped(x, residual):
    """T5's fp16 clamp of a sublayer's sum: the sum is formed here and handed on alone."""
    if residual is None or torch.promote_types(x.dtype, residual.dtype) != torch.float16:
        return x, residual
    return _t5_clamp(residual + x), None


def _t5_clamp(hidden):
    """T5's clamp of an fp16 hidden state (to keep infinities out of fp16 training)."""
    if hidden.dtype != torch.float16:
        return hidden
    limit = torch.where(torch.isinf(hidden).any(), torch.finfo(hidden.dtype).max - 1000,
                        torch.finfo(hidden.dtype).max)
    return torch.clamp(hidden, min=-limit, max=limit)


# A converted sublayer takes (x, residual) and returns (branch, residual, *extras);
# with paired=False (the block does so when hooks watch any of its sublayers) it takes
# and returns what the original does, so that hooks see the original's tensors.

def _t5_sublayer_output(paired, branch, residual, *extras):
    if paired:
        return (branch, residual, *extras)
    total = residual + branch
    return (total, *extras) if extras else total


def _t5_self_attention_forward(self, hidden_states, residual=None, attention_mask=None, position_bias=None,
                               cache=None, *, paired=True, **kwargs):
    normed, residual = self.layer_norm.add_norm(hidden_states, residual)
    attn, position_bias, attn_weights = self.SelfAttention(normed, mask=attention_mask, position_bias=position_bias,
                                                           cache=cache, **kwargs)
    return _t5_sublayer_output(paired, self.dropout(attn), residual, position_bias, attn_weights)


def _t5_cross_attention_forward(self, hidden_states, residual=None, key_value_states=None, attention_mask=None,
                                position_bias=None, cache=None, *, paired=True, **kwargs):
    normed, residual = self.layer_norm.add_norm(hidden_states, residual)
    attn, position_bias, attn_weights = self.EncDecAttention(normed, mask=attention_mask,
                                                             key_value_states=key_value_states,
                                                             position_bias=position_bias, cache=cache, **kwargs)
    return _t5_sublayer_output(paired, self.dropout(attn), residual, position_bias, attn_weights)


def _t5_feed_forward_forward(self, hidden_states, residual=None, *, paired=True):
    normed, residual = self.layer_norm.add_norm(hidden_states, residual)
    return _t5_sublayer_output(paired, self.dropout(self.DenseReluDense(normed)), residual)


_T5_SUBLAYERS = {"T5LayerSelfAttention": _t5_self_attention_forward,
                 "T5LayerCrossAttention": _t5_cross_attention_forward,
                 "T5LayerFF": _t5_feed_forward_forward}


def _t5_block_forward(self, hidden_states, residual=None, attention_mask=None, position_bias=None,
                      encoder_hidden_states=None, encoder_attention_mask=None, encoder_decoder_position_bias=None,
                      cache=None, *, _return_hidden_state=None, **kwargs):
    if any(_observed(sub) for sub in self.layer):
        return _t5_block_unpaired(self, hidden_states, residual, attention_mask, position_bias, encoder_hidden_states,
                                  encoder_attention_mask, encoder_decoder_position_bias, cache, **kwargs)
    x, residual, self_bias, _ = self.layer[0](hidden_states, residual, attention_mask=attention_mask,
                                              position_bias=position_bias, cache=cache, **kwargs)
    x, residual = _t5_clamped(x, residual)
    cross_bias = None
    if self.is_decoder and encoder_hidden_states is not None:
        x, residual, cross_bias, _ = self.layer[1](x, residual, key_value_states=encoder_hidden_states,
                                                   attention_mask=encoder_attention_mask,
                                                   position_bias=encoder_decoder_position_bias, cache=cache,
                                                   **kwargs)
        x, residual = _t5_clamped(x, residual)
    x, residual = _t5_clamped(*self.layer[-1](x, residual))
    out = x if residual is None else _layer_output(self, x, residual, _return_hidden_state)
    return _with_extras(out, self_bias, cross_bias)


def _t5_block_unpaired(self, hidden_states, residual, attention_mask, position_bias, encoder_hidden_states,
                       encoder_attention_mask, encoder_decoder_position_bias, cache, **kwargs):
    """T5's own block, sublayers called as the original calls them (hooks watch one)."""
    hidden = hidden_states if residual is None else residual + hidden_states  # (fp16 sums come clamped)
    hidden, self_bias, _ = self.layer[0](hidden, attention_mask=attention_mask, position_bias=position_bias,
                                         cache=cache, paired=False, **kwargs)
    hidden = _t5_clamp(hidden)
    cross_bias = None
    if self.is_decoder and encoder_hidden_states is not None:
        hidden, cross_bias, _ = self.layer[1](hidden, key_value_states=encoder_hidden_states,
                                              attention_mask=encoder_attention_mask,
                                              position_bias=encoder_decoder_position_bias, cache=cache, paired=False,
                                              **kwargs)
        hidden = _t5_clamp(hidden)
    return _t5_clamp(self.layer[-1](hidden, paired=False)), self_bias, cross_bias


def _whisper_mlp(self, hidden_states):
    hidden_states = self.activation_fn(self.fc1(hidden_states))
    hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
    hidden_states = self.fc2(hidden_states)
    return nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)


def _whisper_encoder_layer_forward(self, hidden_states, residual=None, attention_mask=None, *,
                                   _return_hidden_state=None, **kwargs):
    hidden_states, residual = _input_norm(self.self_attn_layer_norm, hidden_states, residual)
    attn, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
    attn = nn.functional.dropout(attn, p=self.dropout, training=self.training)
    hidden_states, residual = _add_norm(self.final_layer_norm, attn, residual)
    out = _whisper_mlp(self, hidden_states)
    if residual.dtype == torch.float16:  # the sum is clamped before the next norm: it stays here
        total = residual + out
        clamp = torch.finfo(total.dtype).max - 1000
        return torch.clamp(total, min=-clamp, max=clamp)
    return _layer_output(self, out, residual, _return_hidden_state)


def _whisper_decoder_layer_forward(self, hidden_states, residual=None, attention_mask=None,
                                   encoder_hidden_states=None, encoder_attention_mask=None, cache=None,
                                   use_cache=True, *, _return_hidden_state=None, **kwargs):
    hidden_states, residual = _input_norm(self.self_attn_layer_norm, hidden_states, residual)
    attn, _ = self.self_attn(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    attn = nn.functional.dropout(attn, p=self.dropout, training=self.training)
    if encoder_hidden_states is not None:
        hidden_states, residual = _add_norm(self.encoder_attn_layer_norm, attn, residual)
        attn, _ = self.encoder_attn(hidden_states, key_value_states=encoder_hidden_states,
                                    attention_mask=encoder_attention_mask, cache=cache, **kwargs)
        attn = nn.functional.dropout(attn, p=self.dropout, training=self.training)
    hidden_states, residual = _add_norm(self.final_layer_norm, attn, residual)
    out = _whisper_mlp(self, hidden_states)
    return _layer_output(self, out, residual, _return_hidden_state)


_FORWARDS = {"llama": _decoder_layer_forward, "gpt2": _gpt2_block_forward, "vit": _vit_layer_forward,
             "neox": _neox_layer_forward, "whisper_encoder": _whisper_encoder_layer_forward,
             "whisper_decoder": _whisper_decoder_layer_forward, "falcon": _falcon_layer_forward,
             "t5": _t5_block_forward}


def _decoder_layer_call(self, hidden_states, *args, **kwargs):
    if args and _SPECS[self._residual_fused_family].style == "llama":
        raise TypeError(f"{type(self).__name__} takes hidden_states positionally and every other "
                        f"argument by keyword (as the transformers model loop passes them)")
    branch, residual = hidden_states, None
    observed = _observed(self)
    if isinstance(hidden_states, ResidualPair):
        if observed:  # pre-hooks see the hidden state
            branch = hidden_states.hidden_state()
        else:
            branch, residual = hidden_states.branch, hidden_states.residual
    # both positionally: reentrant checkpointing tracks only positional tensors, and the
    # forward returns a flat tuple, (branch, residual, *extras) or (hidden, *extras), so
    # that it tracks every output. Whether it returns the hidden state is decided here,
    # outside the forward: a layer compiled on its own (layer.compile()) then still sees
    # the output collector, which compiled code cannot read, and a checkpoint's
    # recompute gets the same answer as its forward.
    kwargs["_return_hidden_state"] = _returns_hidden_state(self, observed)
    out = nn.Module.__call__(self, branch, residual, *args, **kwargs)
    extras = _SPECS[self._residual_fused_family].extra_outputs
    if not isinstance(out, tuple) or len(out) != extras + 2:
        return out
    pair = ResidualPair(out[0], out[1])
    return (pair, *out[2:]) if extras else pair


@functools.lru_cache(maxsize=None)
def _decoder_classes(model_type: str) -> Tuple[type, type, type]:
    """(model class, decoder layer class, converted decoder layer class)."""
    spec = _SPECS[model_type]
    model_cls, layer_cls = spec.classes()
    made = _made_class(model_type, layer_cls, {"forward": _FORWARDS[spec.style],
                                               "__call__": _decoder_layer_call,
                                               "_residual_fused_family": model_type})
    return model_cls, layer_cls, made


@functools.lru_cache(maxsize=None)
def _t5_sublayer_classes() -> Dict[type, type]:
    """T5's sublayer classes -> their converted classes (which take and return pairs)."""
    module = importlib.import_module("transformers.models.t5.modeling_t5")
    return {getattr(module, name): _made_class("t5", getattr(module, name), {"forward": forward})
            for name, forward in _T5_SUBLAYERS.items()}


def _pairs_to_hidden_states(module, args, output):
    """Forward hook of a model whose own layer loop collects output_hidden_states from
    what each layer returns (Falcon): the pairs it collected become hidden states, the
    same tensors as the unconverted model's."""
    def fixed(states):
        if isinstance(states, tuple) and any(isinstance(h, ResidualPair) for h in states):
            return tuple(h.hidden_state() if isinstance(h, ResidualPair) else h for h in states)
        return states

    if isinstance(output, tuple):
        return tuple(fixed(v) for v in output)
    states = getattr(output, "hidden_states", None)
    if states is not None:
        output.hidden_states = fixed(states)
    return output


def convert_decoder_model(model: nn.Module, model_type: str) -> ConversionReport:
    """Fuse every residual add of the ``model_type`` decoders inside ``model`` (see
    the module docstring); QK-norms run on the kernel. Returns the report."""
    if model_type not in _SPECS:
        raise ValueError(f"model_type {model_type!r} is not a supported pre-norm decoder; "
                         f"supported: {', '.join(sorted(DECODERS))}")
    if model_type in DECODERS:
        _check_version(model_type)
    model_cls, layer_cls, made = _decoder_classes(model_type)
    spec = _SPECS[model_type]
    rms_class = T5KernelRMSNorm if spec.style == "t5" else KernelRMSNorm
    report = ConversionReport(model_type)
    for module in model.modules():
        if not isinstance(module, model_cls):
            continue
        module_layers = getattr(module, spec.layers)
        layers = [layer for layer in module_layers if type(layer) in (layer_cls, made)]
        if len(layers) != len(module_layers):
            raise ValueError(f"model: {type(module).__name__}.{spec.layers} holds modules other than "
                             f"{layer_cls.__name__}; refusing a partial conversion")
        parallel = 0
        config = getattr(module, "config", None)
        if spec.style == "falcon" and config.new_decoder_architecture and not config.parallel_attn:
            raise ValueError(f"model: {type(module).__name__}'s config has new_decoder_architecture=True with "
                             f"parallel_attn=False, a layer transformers' own Falcon forward cannot run; "
                             f"refusing to convert it")
        for k, layer in enumerate(layers):
            if type(layer) is layer_cls:
                where = f"{type(module).__name__}.{spec.layers}[{k}]"
                _check_replaceable(layer, where, replaced=False)
                for j, sub in enumerate(layer.layer if spec.style == "t5" else ()):
                    _check_replaceable(sub, f"{where}.layer[{j}]", replaced=False)
        for layer in layers:
            for parent, name in spec.norm_slots(layer):
                norm = getattr(parent, name)
                if not isinstance(norm, (KernelRMSNorm, KernelLayerNorm)):
                    setattr(parent, name, _kernel_norm(norm, spec.weight_offset, rms_class=rms_class))
            adds, alone = spec.counts(layer)
            report.fused_adds += adds
            report.norms_on_kernel += adds + alone
            report.norms_without_residual += alone
            parallel += _parallel(spec, layer)
            if spec.style == "t5":
                sublayers = _t5_sublayer_classes()
                for sub in layer.layer:
                    sub.__class__ = sublayers.get(type(sub), type(sub))
            layer.__class__ = made
        final = getattr(module, spec.final_norm)
        if not isinstance(final, (KernelRMSNorm, KernelLayerNorm)):
            setattr(module, spec.final_norm, _kernel_norm(final, spec.weight_offset, rms_class=rms_class))
        if spec.style == "falcon" and _pairs_to_hidden_states not in module._forward_hooks.values():
            module.register_forward_hook(_pairs_to_hidden_states, prepend=True)  # before the user's hooks
        if parallel:
            report.left_alone.append(f"{parallel} adds of attn + mlp (a parallel residual's branches): their sum "
                                     f"is added to x in the next fused call")
        report.layers += len(layers)
        if layers:  # the first layer's input norm: no residual yet
            report.norms_on_kernel += 1
            report.norms_without_residual += 1
    if report.layers == 0:
        raise ValueError(f"model: no {model_cls.__name__} found to convert")
    return report


def convert_llama_model(model: nn.Module, *, memory_efficient: bool = False) -> nn.Module:
    """Fuse every residual add of each Llama decoder (2 per layer). Returns ``model``;
    :func:`apply` also returns the report. ``memory_efficient`` is not used by
    pre-norm layers (their backward needs the sum, which they return anyway)."""
    convert_decoder_model(model, "llama")
    return model


# ---- post-norm encoders ---------------------------------------------------------------------

def _output_forward(self, hidden_states, input_tensor):
    return self.LayerNorm(self.dropout(self.dense(hidden_states)), input_tensor)


def _distilbert_block_forward(self, hidden_states, attention_mask=None, **kwargs):
    attn, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    attn = self.sa_layer_norm(attn, hidden_states)  # LayerNorm(attn + hidden_states), fused
    return self.output_layer_norm(self.ffn(attn), attn)


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A post-norm family: in ``transformers.models.<package>``, the ``classes`` whose
    ``forward`` becomes ``forward`` (every ``norm(sublayer + input)`` one fused call)
    and the LayerNorm attributes it uses."""
    package: str
    classes: Tuple[str, ...]
    norms: Tuple[str, ...] = ("LayerNorm",)
    forward: object = _output_forward


#: model_type -> post-norm family.
ENCODERS = {
    "bert": Encoder("bert", ("BertSelfOutput", "BertOutput")),
    "roberta": Encoder("roberta", ("RobertaSelfOutput", "RobertaOutput")),
    "distilbert": Encoder("distilbert", ("TransformerBlock",), ("sa_layer_norm", "output_layer_norm"),
                          _distilbert_block_forward),
}


def convert_encoder_model(model: nn.Module, model_type: str, *,
                          memory_efficient: bool = False) -> ConversionReport:
    """Fuse the two Add & Norm sites of every layer of the ``model_type`` encoders in
    ``model`` (attention output and feed-forward output). Returns the report."""
    if model_type not in ENCODERS:
        raise ValueError(f"model_type {model_type!r} is not a supported post-norm encoder; "
                         f"supported: {', '.join(sorted(ENCODERS))}")
    _check_version(model_type)
    spec = ENCODERS[model_type]
    made = {cls.__mro__[1]: cls for cls in _encoder_classes(model_type)}
    report = ConversionReport(model_type)
    for module in model.modules():
        cls = type(module)
        if cls not in made:
            continue
        _check_replaceable(module, cls.__name__, replaced=False)
        for name in spec.norms:
            setattr(module, name, _kernel_norm(getattr(module, name), memory_efficient=memory_efficient,
                                               where=f"{cls.__name__}.{name}"))
            report.fused_adds += 1
            report.norms_on_kernel += 1
        module.__class__ = made[cls]
    report.layers = report.fused_adds // 2
    if report.fused_adds == 0:
        raise ValueError(f"model: no {' or '.join(spec.classes)} modules found to convert")
    return report


def convert_bert_model(model: nn.Module, *, memory_efficient: bool = False) -> nn.Module:
    """Fuse the two Add & Norm sites of every BERT layer (attention output and
    feed-forward output) into :class:`FusedAddNorm`. Returns ``model``."""
    convert_encoder_model(model, "bert", memory_efficient=memory_efficient)
    return model


# ---- families whose norms come before their adds ----------------------------------------------

#: model_type -> (package, norm class, why its adds stay in PyTorch). Their norms (QK-norms
#: included) run on the kernel without a residual.
NORMS_ONLY = {
    # residual + norm(sublayer(h)), and the next sublayer reads the sum without a norm
    "olmo2": ("olmo2", "Olmo2RMSNorm", "each follows its norm (Olmo2RMSNorm on each sublayer's output), so "
                                       "there is no norm after them to fuse them into"),
}


def convert_norms_model(model: nn.Module, model_type: str) -> ConversionReport:
    """Run every RMSNorm of the ``model_type`` model on the kernel (no add is fused).
    Returns the report."""
    if model_type not in NORMS_ONLY:
        raise ValueError(f"model_type {model_type!r} is not a supported norms-only family; "
                         f"supported: {', '.join(sorted(NORMS_ONLY))}")
    _check_version(model_type)
    package, name, why = NORMS_ONLY[model_type]
    norm_cls = getattr(importlib.import_module(f"transformers.models.{package}.modeling_{package}"), name)
    report = ConversionReport(model_type)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is norm_cls:
                setattr(parent, child_name, _kernel_norm(child))
                report.norms_on_kernel += 1
                report.norms_without_residual += 1
    if report.norms_on_kernel == 0:
        raise ValueError(f"model: no {name} found to convert")
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    report.layers = layers
    report.left_alone.append(f"the residual adds: {why}")
    return report


def convert_stacks_model(model: nn.Module, model_type: str) -> ConversionReport:
    """Fuse every residual add of both stacks of an encoder-decoder family (Whisper,
    T5). Each stack hands (branch, residual) pairs between its layers; its last add is
    fused with its final norm. In fp16, Whisper's encoder clamps each layer's sum before
    the next norm, and T5 clamps every sum: there those adds stay in PyTorch."""
    if model_type not in STACKS:
        raise ValueError(f"model_type {model_type!r} is not a supported encoder-decoder; "
                         f"supported: {', '.join(sorted(STACKS))}")
    _check_version(model_type)
    report = ConversionReport(model_type)
    for key in STACKS[model_type]:
        part = convert_decoder_model(model, key)
        for field in ("fused_adds", "norms_on_kernel", "norms_without_residual", "layers"):
            setattr(report, field, getattr(report, field) + getattr(part, field))
    if model_type == "whisper":
        report.left_alone.append("in fp16 only: the last add of each encoder layer (clamped before the next norm)")
    if model_type == "t5":
        report.left_alone.append("in fp16 only (T5 clamps each sum before the next norm), and where a norm's weight "
                                 "differs in dtype from the hidden states: the adds")
    return report


# ---- the entry point ------------------------------------------------------------------------

def supported_model_types() -> List[str]:
    return sorted(set(DECODERS) | set(ENCODERS) | set(NORMS_ONLY) | set(STACKS))


def _model_types(config) -> Tuple[Optional[str], List[str]]:
    """The model's own model_type and those of its sub-models' configs."""
    subs = []
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if getattr(sub, "model_type", None) is not None:
            subs.append(sub.model_type)
    return getattr(config, "model_type", None), subs


def _convert(model: nn.Module, model_type: str, memory_efficient: bool) -> ConversionReport:
    if model_type in DECODERS:
        return convert_decoder_model(model, model_type)
    if model_type in NORMS_ONLY:
        return convert_norms_model(model, model_type)
    if model_type in STACKS:
        return convert_stacks_model(model, model_type)
    return convert_encoder_model(model, model_type, memory_efficient=memory_efficient)


def apply(model: nn.Module, *, memory_efficient: bool = False) -> ConversionReport:
    """Convert ``model`` (in place) for its ``config.model_type``, or, for a
    composite model, its sub-models' types; returns what was fused. An unsupported
    type is an error naming the supported ones; a composite model whose sub-models
    are only partly supported is converted where it can be, with a warning naming
    what was left. ``memory_efficient`` applies to post-norm encoders."""
    config = getattr(model, "config", None)
    supported = ", ".join(supported_model_types())
    own, subs = _model_types(config)
    if own is None:
        raise ValueError(f"model: apply needs a transformers model (a module with config.model_type); "
                         f"supported model types: {supported}")
    known = set(supported_model_types())
    wanted = [own] if own in known or not subs else subs
    todo = [t for t in wanted if t in known]
    left = [t for t in wanted if t not in todo]
    if not todo:
        raise ValueError(f"model: model_type {own!r}{' (sub-models: ' + ', '.join(subs) + ')' if subs else ''} "
                         f"is not supported by residual_fused.integrations.huggingface.apply; "
                         f"supported model types: {supported}")
    report = ConversionReport(own)
    for model_type in todo:
        part = _convert(model, model_type, memory_efficient)
        for field in ("fused_adds", "norms_on_kernel", "norms_without_residual", "layers"):
            setattr(report, field, getattr(report, field) + getattr(part, field))
        report.left_alone += part.left_alone
    if left:
        report.left_alone += [f"sub-model of type {t!r} (not supported)" for t in left]
        warnings.warn(f"residual_fused: {own} converted partly ({', '.join(todo)}); left unconverted: "
                      f"{', '.join(left)}", stacklevel=2)
    return report


def _encoder_classes(model_type: str) -> List[type]:
    spec = ENCODERS[model_type]
    module = importlib.import_module(f"transformers.models.{spec.package}.modeling_{spec.package}")
    return [_made_class(model_type, getattr(module, name), {"forward": spec.forward}) for name in spec.classes]


def _t5_classes():
    return _decoder_classes("t5"), _t5_sublayer_classes()


_FAMILY_CLASSES = {**{t: functools.partial(_decoder_classes, t) for t in _SPECS},
                   **{t: functools.partial(_encoder_classes, t) for t in ENCODERS},
                   "t5": _t5_classes}
