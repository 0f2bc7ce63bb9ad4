"""Bad input raises a clear error naming the argument and the rule; nothing is modified."""

import math

import pytest
import torch

import residual_fused as rf
from conftest import DEVICES
from residual_fused._validation import check_add_norm_args

FUNCTIONS = [rf.add_layer_norm, rf.reference.add_layer_norm]


def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_residual_shape_mismatch_says_projection(fn):
    with pytest.raises(ValueError, match=r"residual: shape \(4, 32\).*x's shape \(4, 64\).*same shape.*project"):
        fn(_x(4, 64), _x(4, 32))


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_trailing_dims_must_match_normalized_shape(fn):
    with pytest.raises(ValueError, match=r"x: trailing dims.*normalized_shape \(32,\)"):
        fn(_x(4, 64), normalized_shape=32)
    with pytest.raises(ValueError, match=r"normalized_shape \(32,\), which was taken from "
                                         r"the normalized_shape argument"):
        fn(_x(4, 64), normalized_shape=32)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_wrong_weight_shape_is_named_as_the_source(fn):
    """normalized_shape defaults to weight.shape: the error says so, not just 'x'."""
    with pytest.raises(ValueError, match=r"x: trailing dims of shape \(4, 8, 16\) must equal "
                                         r"normalized_shape \(32,\), which was taken from "
                                         r"weight.shape; pass normalized_shape"):
        fn(_x(4, 8, 16), weight=_x(32))
    with pytest.raises(ValueError, match=r"bias: shape \(15,\) must equal normalized_shape "
                                         r"\(16,\), which was taken from weight.shape"):
        fn(_x(4, 16), weight=_x(16), bias=_x(15))


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_weight_and_bias_shapes(fn):
    with pytest.raises(ValueError, match=r"weight: shape \(64, 1\) must equal normalized_shape \(64,\)"):
        fn(_x(4, 64), weight=_x(64, 1), normalized_shape=64)
    with pytest.raises(ValueError, match=r"bias: shape \(63,\) must equal normalized_shape \(64,\)"):
        fn(_x(4, 64), weight=_x(64), bias=_x(63))


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("arg", ["x", "residual", "weight", "bias"])
def test_non_floating_dtypes(fn, arg):
    args = {"x": _x(4, 8), "residual": _x(4, 8), "weight": _x(8), "bias": _x(8)}
    args[arg] = args[arg].to(torch.int64)
    with pytest.raises(TypeError, match=rf"{arg}: dtype torch.int64 is not supported.*floating"):
        fn(args["x"], args["residual"], args["weight"], args["bias"])


def test_residual_dtype_must_be_floating():
    with pytest.raises(TypeError, match="residual_dtype must be one of"):
        rf.add_layer_norm(_x(2, 8), _x(2, 8), prenorm=True, residual_dtype=torch.int32)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="residual must be a torch.Tensor, got list"):
        rf.add_layer_norm(_x(2, 3), [[1.0, 2.0, 3.0]] * 2)


def test_zero_dim_and_empty_normalized_shape():
    with pytest.raises(ValueError, match="0-d tensor"):
        rf.add_layer_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match="normalized_shape must be non-empty with positive sizes"):
        rf.add_layer_norm(_x(2, 0))


def test_devices_must_match():
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="residual is on meta but x is on cpu; all tensors"):
        rf.add_layer_norm(_x(4, 8), meta)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        rf.add_rms_norm(_x(4, 8), weight=torch.empty(8, device="meta"))


@pytest.mark.parametrize("eps", [-1e-5, math.inf, math.nan, "1e-5", True])
def test_eps_must_be_non_negative(eps):
    with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
        rf.add_layer_norm(_x(2, 8), eps=eps)
    with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
        rf.add_rms_norm(_x(2, 8), eps=eps)


@pytest.mark.parametrize("eps", [-1, -1e-5, math.inf, math.nan, "1e-5", True])
@pytest.mark.parametrize("cls", [rf.FusedAddNorm, rf.FusedAddRMSNorm])
def test_module_constructors_check_eps(cls, eps):
    with pytest.raises(ValueError, match=rf"eps of {cls.__name__} must be a finite non-negative"):
        cls(16, eps=eps)


def test_module_constructors_check_shape():
    with pytest.raises(ValueError, match="eps of FusedAddNorm must be"):
        rf.FusedAddNorm(16, eps=None)  # as nn.LayerNorm: only RMSNorm derives eps from dtype
    assert rf.FusedAddRMSNorm(16, eps=None).eps is None
    with pytest.raises(TypeError, match=r"normalized_shape must be an int or a sequence of ints, got 3.5"):
        rf.FusedAddNorm(3.5)
    with pytest.raises(TypeError, match=r"normalized_shape must be .*got \(16, '8'\)"):
        rf.FusedAddRMSNorm((16, "8"))
    for shape in (0, (), (16, 0), -3):
        with pytest.raises(ValueError, match="normalized_shape must be non-empty with positive"):
            rf.FusedAddNorm(shape)


@pytest.mark.parametrize("fn", [rf.add_layer_norm, rf.add_rms_norm])
def test_double_backward_says_what_to_do(fn):
    x, r, w = (_x(*shape).requires_grad_() for shape in ((4, 16), (4, 16), (16,)))
    y = fn(x, r, w)
    # Through the incoming gradient (dy depends on y) ...
    dx, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* not supported by the fused ops; "
                                           r"use residual_fused.reference"):
        dx.sum().backward()
    # ... and through the saved tensors alone (dy is constant): never a silent zero.
    dx, = torch.autograd.grad(fn(x, r, w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (dx * x).sum().backward()
    # create_graph=True still gives the first derivatives; only differentiating them raises.
    dw, = torch.autograd.grad(fn(x, r, w).sum(), w, create_graph=True)
    expected, = torch.autograd.grad(fn(x, r, w).sum(), w)
    assert torch.equal(dw.detach(), expected)


def test_rms_norm_has_no_bias():
    with pytest.raises(TypeError, match="bias"):
        rf.add_rms_norm(_x(2, 8), bias=_x(8))  # noqa
    with pytest.raises(ValueError, match="bias: RMSNorm has no bias"):
        check_add_norm_args(_x(2, 8), None, None, _x(8), 1e-6, None, None, True)
    with pytest.raises(TypeError, match="bias"):
        rf.FusedAddRMSNorm(8, bias=True)


def test_module_checks_shapes_too():
    norm = rf.FusedAddNorm(16)
    with pytest.raises(ValueError, match="x: trailing dims"):
        norm(_x(2, 8))
    with pytest.raises(ValueError, match="residual: shape"):
        norm(_x(2, 16), _x(3, 16))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate_row_wise(device):
    x, r = _x(4, 32, device=device), _x(4, 32, device=device)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    for fn, ref in ((rf.add_layer_norm, rf.reference.add_layer_norm),
                    (rf.add_rms_norm, rf.reference.add_rms_norm)):
        y, expected = fn(x, r), ref(x, r)
        torch.testing.assert_close(y, expected, equal_nan=True)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 3]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_memory_efficient_zero_weight_gives_nan_not_garbage(device):
    """xhat = (y - b) / w cannot be recovered where w == 0: the gradients say so."""
    w = torch.ones(16, device=device)
    w[3] = 0.0
    x = _x(2, 16, device=device).requires_grad_()
    rf.add_layer_norm(x, weight=w, bias=torch.zeros(16, device=device),
                      memory_efficient=True).sum().backward()
    assert torch.isnan(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prenorm", [False, True])
def test_inputs_are_never_modified(device, prenorm):
    args = [_x(3, 40, device=device, dtype=torch.float32).requires_grad_() for _ in range(2)]
    w, b = _x(40, device=device).requires_grad_(), _x(40, device=device).requires_grad_()
    before = [t.detach().clone() for t in (*args, w, b)]
    versions = [t._version for t in (*args, w, b)]
    out = rf.add_layer_norm(*args, w, b, prenorm=prenorm, residual_dtype=torch.float32)
    outs = out if prenorm else (out,)
    sum(o.sum() for o in outs).backward()
    for t, old, version in zip((*args, w, b), before, versions):
        assert torch.equal(t.detach(), old) and t._version == version


@pytest.mark.parametrize("device", DEVICES)
def test_residual_out_never_aliases_x(device):
    x = _x(3, 40, device=device)
    _, residual_out = rf.add_layer_norm(x, prenorm=True)
    assert residual_out.data_ptr() != x.data_ptr() and torch.equal(residual_out, x)


# The ops themselves, on the compiled kernels (where built) and on the reference, which
# must refuse the same calls with the same words.
_OP_PATHS = ["compiled", "reference"]


def _fwd(path):
    from residual_fused import ops

    return torch.ops.residual_fused.add_norm_fwd if path == "compiled" else ops._add_norm_fwd_reference


def _bwd(path):
    from residual_fused import ops

    return torch.ops.residual_fused.add_norm_bwd if path == "compiled" else ops._add_norm_bwd_reference


@pytest.mark.parametrize("path", _OP_PATHS)
def test_store_mean_is_for_layer_norm(path):
    x = _x(4, 16)
    with pytest.raises(RuntimeError, match=r"store_mean: RMSNorm has no row mean"):
        _fwd(path)(x, None, None, None, 1e-5, True, False, x.dtype, 0.0, True)


@pytest.mark.parametrize("path", _OP_PATHS)
def test_backward_mean_rules(path):
    """The forward's mean goes only to LayerNorm's backward from the sum, with one
    float per row of rstd's dtype; nothing the caller passed is modified."""
    dy, saved, rstd, mean = _x(4, 16), _x(4, 16), torch.rand(4) + 0.5, _x(4)
    before = [t.clone() for t in (dy, saved, rstd, mean)]
    bwd = _bwd(path)
    with pytest.raises(RuntimeError, match=r"mean: RMSNorm has no row mean; pass None"):
        bwd(dy, None, saved, rstd, None, None, True, False, None, 0.0, mean)
    with pytest.raises(RuntimeError, match=r"mean: the memory-efficient backward rebuilds xhat from y"):
        bwd(dy, None, saved, rstd, None, None, False, True, None, 0.0, mean)
    with pytest.raises(RuntimeError, match=r"mean must hold one float32 per row \(the forward's mean output\)"):
        bwd(dy, None, saved, rstd, None, None, False, False, None, 0.0, mean[:3])
    with pytest.raises(RuntimeError, match=r"mean must hold one float32 per row"):
        bwd(dy, None, saved, rstd, None, None, False, False, None, 0.0, mean.double())
    for b, a in zip(before, (dy, saved, rstd, mean)):
        assert torch.equal(b, a)
    # the same call with the mean and without it: the same gradient (it is only a shift)
    with_mean = bwd(dy, None, saved, rstd, None, None, False, False, None, 0.0, saved.mean(-1))[0]
    without = bwd(dy, None, saved, rstd, None, None, False, False, None, 0.0, None)[0]
    torch.testing.assert_close(with_mean, without, rtol=1e-5, atol=1e-6)
