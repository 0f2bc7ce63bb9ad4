"""The library's PyTorch ops, their fake kernels, and their autograd in Python.

Schemas are defined here and only here. The pure-PyTorch reference is registered
as the ``CompositeExplicitAutograd`` kernel, so it runs on any device the compiled
extension does not cover; the extension (``residual_fused._C``), when built, adds
``CPU`` kernels and, in CUDA builds, ``CUDA`` kernels for the same schemas, which
take precedence on their devices, and the autograd of ``add_norm`` in C++ (without it,
``AddNormFunction`` here). ``_loader`` finds and loads the compiled libraries (or
builds them on first use); the call path at the end picks ``_C``'s plain-function
entries or ``torch.ops``.

The ops work on rows of the last dim: ``x`` is ``[..., H]`` and ``weight``/``bias``
are ``[H]``; the functional API folds a multi-dim ``normalized_shape`` into ``H``.
Outputs that a call does not produce are returned as 0-element placeholders
(a schema's outputs are fixed), and callers decide by flags, never by ``numel``.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _loader, reference
from .support import compute_dtype

_lib = torch.library.Library("residual_fused", "DEF")

# y = norm(x + residual) * (weight + weight_offset) + bias, in x's dtype (the offset is
# added in the compute type: Gemma's 1 + w); residual_out = x + residual rounded to
# residual_out_dtype (a placeholder unless store_residual_out); rstd per row in fp32
# (fp64 for fp64 x); mean: LayerNorm's row mean of x + residual in rstd's type (a
# placeholder unless store_mean), which the backward may take as a shift.
_lib.define(
    "add_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
    "bool is_rms_norm, bool store_residual_out, ScalarType residual_out_dtype, "
    "float weight_offset=0., bool store_mean=False) "
    "-> (Tensor y, Tensor residual_out, Tensor rstd, Tensor mean)"
)
# saved is residual_out (or x when there was no residual), or y when memory_efficient.
# dx has dy's dtype and already includes dresidual_out. dresidual is a separate
# tensor only when dresidual_dtype is given (the residual's dtype differs from x's);
# otherwise dx serves as the residual's gradient too. dweight/dbias have the
# dtypes of weight/bias, and are placeholders when those are absent. weight_offset is
# the forward's: dx uses weight + weight_offset, dweight is weight's own gradient.
# mean is the forward's mean output (LayerNorm, not memory_efficient), or None. The
# result does not depend on it: LayerNorm's xhat is re-centred over the saved row
# either way. It is the shift that lets a kernel take the row's sums in one reduction
# without cancellation (the CUDA rows kernels' ring variant does); without it a kernel
# reduces the row for its mean first.
_lib.define(
    "add_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor saved, Tensor rstd, "
    "Tensor? weight, Tensor? bias, bool is_rms_norm, bool memory_efficient, "
    "ScalarType? dresidual_dtype, float weight_offset=0., Tensor? mean=None) "
    "-> (Tensor dx, Tensor dresidual, Tensor dweight, Tensor dbias)"
)

# The differentiable Add & Norm the functional API calls: y, and residual_out = x +
# residual rounded to residual_out_dtype when prenorm (a placeholder otherwise). Its
# autograd (csrc/autograd.cpp with the compiled library, else AddNormFunction below)
# saves what add_norm_bwd needs: the sum (y when memory_efficient), rstd and
# LayerNorm's row mean; with no gradient to record it is add_norm_fwd alone.
_lib.define(
    "add_norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool is_rms_norm, "
    "bool prenorm, ScalarType residual_out_dtype, bool memory_efficient=False, float weight_offset=0.) "
    "-> (Tensor y, Tensor residual_out)"
)

# The inference forms of the forward (no autograd: refused where a gradient is needed).
# add_norm_fwd_out writes y into `out` (x's dtype) and x + residual into `residual_out`
# (in that buffer's dtype) when given. add_norm_fwd_inplace is vLLM's fused add & norm:
# residual := x + residual (in residual's dtype), then x := norm(residual). A buffer
# may be exactly an input (written over in place) or clear of every input; anything
# else is refused (csrc/glue_impl.h, reference.check_output_buffers).
_lib.define(
    "add_norm_fwd_out(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
    "bool is_rms_norm, float weight_offset, Tensor(a!) out, Tensor(b!)? residual_out) -> ()"
)
_lib.define(
    "add_norm_fwd_inplace(Tensor(a!) x, Tensor(b!) residual, Tensor? weight, Tensor? bias, "
    "float eps, bool is_rms_norm, float weight_offset) -> ()"
)


def _placeholder(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _build_on_first_use(device: torch.device) -> bool:
    """The kernels for ``device``, built and loaded where none are (``_loader``); the
    Python autograd makes way for the C++ one where the CPU kernels' library loads."""
    return _loader.build_on_first_use(device, _drop_python_autograd)


def _add_norm_fwd_reference(x, residual, weight, bias, eps, is_rms_norm,
                            store_residual_out, residual_out_dtype, weight_offset=0.0, store_mean=False):
    if _build_on_first_use(x.device):  # dispatch again, now to the compiled kernel
        return add_norm_fwd(x, residual, weight, bias, eps, is_rms_norm,
                            store_residual_out, residual_out_dtype, weight_offset, store_mean)
    _loader.notice_reference(x.device)
    reference.check_weight_offset(weight_offset, weight)
    if store_mean and is_rms_norm:
        raise RuntimeError("store_mean: RMSNorm has no row mean")
    y, s, rstd = reference.forward(x, residual, weight, bias, eps, is_rms_norm, weight_offset)
    if store_residual_out:
        # s is x itself when x needs no cast and there is no residual: never alias.
        residual_out = s.to(residual_out_dtype, copy=s is x).contiguous()
    else:
        residual_out = _placeholder(x)
    mean = s.to(rstd.dtype).mean(-1) if store_mean else _placeholder(x)
    return y.contiguous(), residual_out, rstd, mean


def _add_norm_bwd_reference(dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm,
                            memory_efficient, dresidual_dtype, weight_offset=0.0, mean=None):
    reference.check_weight_offset(weight_offset, weight)
    ds, dweight, dbias = reference.backward(
        dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm, memory_efficient, weight_offset, mean
    )
    dx = ds.to(dy.dtype).contiguous()
    dresidual = _placeholder(dy) if dresidual_dtype is None else ds.to(dresidual_dtype).contiguous()
    dweight = _placeholder(dy) if weight is None else dweight.to(weight.dtype)
    dbias = _placeholder(dy) if bias is None else dbias.to(bias.dtype)
    return dx, dresidual, dweight, dbias


def _add_norm_fwd_out_reference(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out,
                                residual_out):
    if _build_on_first_use(x.device):
        return add_norm_fwd_out(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out)
    _loader.notice_reference(x.device)
    _write_into(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out,
                "out", "residual_out")


def _add_norm_fwd_inplace_reference(x, residual, weight, bias, eps, is_rms_norm, weight_offset):
    if _build_on_first_use(x.device):
        return add_norm_fwd_inplace(x, residual, weight, bias, eps, is_rms_norm, weight_offset)
    _loader.notice_reference(x.device)
    _write_into(x, residual, weight, bias, eps, is_rms_norm, weight_offset, x, residual, "x", "residual")


def _write_into(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out,
                out_name, residual_out_name):
    reference.check_weight_offset(weight_offset, weight)
    if is_rms_norm and bias is not None:
        raise RuntimeError("bias: RMSNorm has no bias")
    if eps < 0:
        raise RuntimeError(f"eps must be non-negative, got {eps}")
    reference.check_output_buffers(x, residual, weight, bias, out, residual_out, out_name, residual_out_name)
    # Both results exist before either buffer is written: a buffer may be an input.
    y, s, _ = reference.forward(x, residual, weight, bias, eps, is_rms_norm, weight_offset)
    if residual_out is not None:
        residual_out.copy_(s)
    out.copy_(y)


_lib.impl("add_norm_fwd", _add_norm_fwd_reference, "CompositeExplicitAutograd")
_lib.impl("add_norm_bwd", _add_norm_bwd_reference, "CompositeExplicitAutograd")
_lib.impl("add_norm_fwd_out", _add_norm_fwd_out_reference, "CompositeExplicitAutograd")
_lib.impl("add_norm_fwd_inplace", _add_norm_fwd_inplace_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("residual_fused::add_norm_fwd", lib=_lib)
def _add_norm_fwd_fake(x, residual, weight, bias, eps, is_rms_norm,
                       store_residual_out, residual_out_dtype, weight_offset=0.0, store_mean=False):
    y = x.new_empty(x.shape)
    residual_out = (x.new_empty(x.shape, dtype=residual_out_dtype)
                    if store_residual_out else _placeholder(x))
    rstd = x.new_empty(x.shape[:-1], dtype=compute_dtype(x.dtype))
    mean = torch.empty_like(rstd) if store_mean else _placeholder(x)
    return y, residual_out, rstd, mean


@torch.library.register_fake("residual_fused::add_norm_bwd", lib=_lib)
def _add_norm_bwd_fake(dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm,
                       memory_efficient, dresidual_dtype, weight_offset=0.0, mean=None):
    dx = dy.new_empty(dy.shape)
    dresidual = (_placeholder(dy) if dresidual_dtype is None
                 else dy.new_empty(dy.shape, dtype=dresidual_dtype))
    dweight = _placeholder(dy) if weight is None else torch.empty_like(weight)
    dbias = _placeholder(dy) if bias is None else torch.empty_like(bias)
    return dx, dresidual, dweight, dbias


@torch.library.register_fake("residual_fused::add_norm", lib=_lib)
def _add_norm_fake(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                   memory_efficient=False, weight_offset=0.0):
    y = x.new_empty(x.shape)
    residual_out = x.new_empty(x.shape, dtype=residual_out_dtype) if prenorm else _placeholder(x)
    return y, residual_out


@torch.library.register_fake("residual_fused::add_norm_fwd_out", lib=_lib)
def _add_norm_fwd_out_fake(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out):
    return None


@torch.library.register_fake("residual_fused::add_norm_fwd_inplace", lib=_lib)
def _add_norm_fwd_inplace_fake(x, residual, weight, bias, eps, is_rms_norm, weight_offset):
    return None


add_norm = torch.ops.residual_fused.add_norm
add_norm_fwd = torch.ops.residual_fused.add_norm_fwd
add_norm_bwd = torch.ops.residual_fused.add_norm_bwd
add_norm_fwd_out = torch.ops.residual_fused.add_norm_fwd_out
add_norm_fwd_inplace = torch.ops.residual_fused.add_norm_fwd_inplace

NO_GRAD_FORMS = ("the out= and in-place forms write into buffers and record no gradient; call them "
                  "under torch.no_grad() or torch.inference_mode(), or use the functional form without "
                  "out= for training")


def grad_needed(*tensors) -> bool:
    """Whether autograd would record a call on ``tensors`` (None for absent ones)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _refuse_grad(name, *tensors):
    if grad_needed(*tensors):
        raise RuntimeError(f"residual_fused::{name}: a tensor requires grad: {NO_GRAD_FORMS}")


def _add_norm_fwd_out_autograd(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out):
    _refuse_grad("add_norm_fwd_out", x, residual, weight, bias, out, residual_out)
    with torch._C._AutoDispatchBelowAutograd():
        return add_norm_fwd_out(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out)


def _add_norm_fwd_inplace_autograd(x, residual, weight, bias, eps, is_rms_norm, weight_offset):
    _refuse_grad("add_norm_fwd_inplace", x, residual, weight, bias)
    with torch._C._AutoDispatchBelowAutograd():
        return add_norm_fwd_inplace(x, residual, weight, bias, eps, is_rms_norm, weight_offset)


def _add_norm_fwd_out_version(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out):
    with torch._C._AutoDispatchBelowADInplaceOrView():
        add_norm_fwd_out(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out)
    _new_versions(out, residual_out)


def _add_norm_fwd_inplace_version(x, residual, weight, bias, eps, is_rms_norm, weight_offset):
    with torch._C._AutoDispatchBelowADInplaceOrView():
        add_norm_fwd_inplace(x, residual, weight, bias, eps, is_rms_norm, weight_offset)
    _new_versions(x, residual)


def _new_versions(*written):
    """The tensors a call wrote get a new version, as after a torch in-place op: autograd
    then refuses a backward that saved one of them before."""
    for t in written:
        if t is not None:
            torch.autograd.graph.increment_version(t)


def _add_norm_forward_only(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                           memory_efficient=False, weight_offset=0.0):
    return tuple(add_norm_fwd(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                              weight_offset)[:2])


def _add_norm_autograd(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                       memory_efficient=False, weight_offset=0.0):
    if not grad_needed(x, residual, weight, bias):
        with torch._C._AutoDispatchBelowAutograd():
            return _add_norm_forward_only(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                                          memory_efficient, weight_offset)
    out = AddNormFunction.apply(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                                memory_efficient, weight_offset)
    return out if prenorm else (out, _placeholder(x))


# The autograd of add_norm, and the inference forms' rule and version counts, registered from Python only
# while the per-torch library (_C, csrc/autograd.cpp: the same in C++) is not loaded.
_python_autograd = None


def _register_python_autograd() -> None:
    global _python_autograd
    _python_autograd = torch.library.Library("residual_fused", "IMPL")
    _python_autograd.impl("add_norm", _add_norm_autograd, "Autograd")
    _python_autograd.impl("add_norm", _add_norm_forward_only, "CompositeExplicitAutograd")
    _python_autograd.impl("add_norm_fwd_out", _add_norm_fwd_out_autograd, "Autograd")
    _python_autograd.impl("add_norm_fwd_inplace", _add_norm_fwd_inplace_autograd, "Autograd")
    _python_autograd.impl("add_norm_fwd_out", _add_norm_fwd_out_version, "ADInplaceOrView")
    _python_autograd.impl("add_norm_fwd_inplace", _add_norm_fwd_inplace_version, "ADInplaceOrView")


def _drop_python_autograd() -> None:
    global _python_autograd
    if _python_autograd is not None:
        _python_autograd._destroy()
        _python_autograd = None


_DOUBLE_BACKWARD = (
    b"residual_fused: double backward (differentiating the gradients of add_layer_norm "
    b"or add_rms_norm again, as after autograd.grad(..., create_graph=True)) is not "
    b"supported by the fused ops; use residual_fused.reference.add_layer_norm / "
    b"add_rms_norm, plain differentiable PyTorch, where higher-order gradients are needed")


def _first_order_only(backward):
    """Run ``backward(ctx, saved_tensors, *grads)`` without recording a graph. Where the
    caller asked for one (``create_graph=True``) and something it depends on requires
    grad, its outputs get a grad_fn that raises ``_DOUBLE_BACKWARD`` if it is ever
    differentiated (as once_differentiable does, with a message that says what to do
    instead)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        # Unpacked once per backward: non-reentrant checkpointing recomputes a saved
        # tensor on its first unpack and refuses a second.
        saved = ctx.saved_tensors
        with torch.no_grad():
            outputs = backward(ctx, saved, *grads)
        # The gradients depend on the incoming grads and on the saved tensors: if
        # either needs a graph, a second derivative could flow here and must raise,
        # never come out silently zero.
        inputs = (*grads, *saved)
        if not torch.is_grad_enabled() or not any(
                isinstance(t, Tensor) and t.requires_grad for t in inputs):
            return outputs
        tensors = [o for o in outputs if o is not None]
        raising = torch._C._functions.DelayedError(_DOUBLE_BACKWARD, len(tensors))(
            *[o.detach().requires_grad_() for o in tensors])
        raising = iter(raising if isinstance(raising, tuple) else (raising,))
        return tuple(None if o is None else next(raising) for o in outputs)

    return wrapper


class AddNormFunction(torch.autograd.Function):
    """Autograd for Add & Norm over the last dim, through the two ops.

    ``apply(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
    memory_efficient, weight_offset)`` with ``x``/``residual`` ``[..., H]`` and ``weight``/``bias``
    ``[H]``, as prepared by :mod:`residual_fused.functional` (which validates them).
    Returns ``y``, or ``(y, residual_out)`` when ``prenorm``.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms_norm, prenorm,
                residual_out_dtype, memory_efficient, weight_offset=0.0):
        # Post-norm without a residual normalizes x itself, so x is what backward needs.
        store = prenorm or (residual is not None and not memory_efficient)
        # LayerNorm's row mean, for the backward's shift where it rebuilds xhat from the sum.
        store_mean = not is_rms_norm and not memory_efficient
        y, residual_out, rstd, mean = add_norm_fwd(
            x, residual, weight, bias, eps, is_rms_norm, store, residual_out_dtype, weight_offset, store_mean
        )
        saved = y if memory_efficient else (residual_out if store else x)
        ctx.save_for_backward(saved, rstd, weight, bias, mean if store_mean else None)
        ctx.is_rms_norm = is_rms_norm
        ctx.memory_efficient = memory_efficient
        ctx.weight_offset = weight_offset
        ctx.has_residual = residual is not None
        ctx.x_dtype = x.dtype
        ctx.dresidual_dtype = (residual.dtype if residual is not None
                               and residual.dtype != x.dtype else None)
        ctx.set_materialize_grads(False)
        return (y, residual_out) if prenorm else y

    @staticmethod
    @_first_order_only
    def backward(ctx, saved_tensors, dy: Optional[Tensor], dresidual_out: Optional[Tensor] = None):
        saved, rstd, weight, bias, mean = saved_tensors
        none = (None,) * 6
        if dy is None and dresidual_out is None:
            return (None, None, None, None) + none
        if dy is None:  # only residual_out was used: y's gradient is zero
            dy = saved.new_zeros(saved.shape, dtype=ctx.x_dtype)
        dx, dresidual, dweight, dbias = add_norm_bwd(
            dy, dresidual_out, saved, rstd, weight, bias,
            ctx.is_rms_norm, ctx.memory_efficient, ctx.dresidual_dtype, ctx.weight_offset, mean,
        )
        if not ctx.has_residual:
            dresidual = None
        elif ctx.dresidual_dtype is None:
            dresidual = dx
        return (dx, dresidual, None if weight is None else dweight,
                None if bias is None else dbias) + none


_c_module = _loader.load_installed()  # residual_fused._C where it imported: the plain-function entries
if _c_module is None:
    _register_python_autograd()


# ---- the call path ----------------------------------------------------------------------
# The ops through _C's plain functions (csrc/module.cpp): the same dispatcher call as
# torch.ops makes, without its per-argument Python matching. Taken only where that
# layer would do nothing else: no __torch_function__ override or mode among the
# arguments, and not while torch.compile traces (it records torch.ops calls).


def _direct(tensors, compiling=None) -> bool:
    """``compiling``: whether torch.compile is tracing, where the caller knows it already."""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    return _c_module is not None and not compiling and not torch._C._has_torch_function(tensors)


def call_add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype, memory_efficient,
                  weight_offset, compiling=None):
    """add_norm(...) -> (y, residual_out), differentiable."""
    if _direct((x, residual, weight, bias), compiling):
        return _c_module.add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                                  memory_efficient, weight_offset)
    return add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype, memory_efficient,
                    weight_offset)


def call_fwd_out(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out):
    if _direct((x, residual, weight, bias, out, residual_out)):
        return _c_module.add_norm_fwd_out(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out,
                                          residual_out)
    return add_norm_fwd_out(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out)


def call_fwd_inplace(x, residual, weight, bias, eps, is_rms_norm, weight_offset):
    if _direct((x, residual, weight, bias)):
        return _c_module.add_norm_fwd_inplace(x, residual, weight, bias, eps, is_rms_norm, weight_offset)
    return add_norm_fwd_inplace(x, residual, weight, bias, eps, is_rms_norm, weight_offset)
