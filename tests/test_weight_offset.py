"""weight_offset: the weight used is weight + weight_offset (Gemma's 1 + w), added in
the compute type inside the kernels; the gradient is that of the raw weight."""

import math

import pytest
import torch

import residual_fused as rf
from residual_fused import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _data(dtype, device, rows=6, hidden=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) + 2).to(device, dtype)
    r = torch.randn(rows, hidden, generator=gen).to(device, dtype)
    w = (0.3 * torch.randn(hidden, generator=gen)).to(device, dtype)
    b = (0.3 * torch.randn(hidden, generator=gen)).to(device, dtype)
    return x, r, w, b


def _autograd_reference(x, r, w, b, offset, rms, prenorm):
    """Plain PyTorch in float64 with (w + offset) as a differentiable expression."""
    xs, rs, ws = (t.detach().double().requires_grad_() for t in (x, r, w))
    bs = None if b is None else b.detach().double().requires_grad_()
    s = xs + rs
    if rms:
        y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-5) * (ws + offset)
    else:
        y = torch.nn.functional.layer_norm(s, s.shape[-1:], ws + offset, bs, 1e-5)
    return (y, s) if prenorm else (y,), (xs, rs, ws, bs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["", "memory_efficient"])
@pytest.mark.parametrize("prenorm", [False, True], ids=["postnorm", "prenorm"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("offset", [1.0, -0.25])
def test_matches_autograd_of_the_offset_weight(device, offset, rms, prenorm, memory_efficient):
    # fp32 outputs: a missing or doubled offset is far outside these tolerances
    x, r, w, b = _data(torch.float32, device)
    b = None if rms else b
    if memory_efficient:  # (y - b) / (w + offset) needs the weight used away from zero
        w = torch.sign(w) * (0.5 + w.abs()) - offset
    ins = [t.clone().requires_grad_() for t in (x, r, w)] + [None if b is None else b.clone().requires_grad_()]
    kw = dict(prenorm=prenorm, memory_efficient=memory_efficient, weight_offset=offset)
    out = (rf.add_rms_norm(ins[0], ins[1], ins[2], 1e-5, **kw) if rms
           else rf.add_layer_norm(*ins, 1e-5, **kw))
    out = out if prenorm else (out,)
    want, leaves = _autograd_reference(x, r, w, b, offset, rms, prenorm)
    gen = torch.Generator().manual_seed(1)
    ups = [torch.randn(o.shape, generator=gen, dtype=torch.float64) / 8 for o in want]
    sum((o.double() * u.to(o.device)).sum() for o, u in zip(out, ups)).backward()
    sum((o * u.to(o.device)).sum() for o, u in zip(want, ups)).backward()
    for got, ref in zip(out, want):
        torch.testing.assert_close(got.double(), ref.detach(), rtol=2e-5, atol=2e-5)
    for t, leaf in zip(ins, leaves):
        if t is not None:
            torch.testing.assert_close(t.grad.double(), leaf.grad, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_weights_add_the_offset_in_fp32(device, dtype):
    """Gemma's norm: (1 + w) in fp32, not rounded to the weight's dtype first (fp32 x
    and output, so the difference shows)."""
    x, r, _, _ = _data(torch.float32, device, hidden=64)
    w = (1e-3 * torch.randn(64, generator=torch.Generator().manual_seed(3))).to(device, dtype)
    y = rf.add_rms_norm(x, r, w, 1e-6, weight_offset=1.0)
    s = x + r
    normed = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-6)
    want = normed * (1.0 + w.float())
    rounded_first = normed * (1.0 + w).float()
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    assert (rounded_first - want).abs().max() > 100 * (y - want).abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_offset(device):
    x, r, w, b = (t.double().requires_grad_() for t in _data(torch.float64, device, rows=3, hidden=7))
    for fn in (lambda x, r, w, b: rf.add_layer_norm(x, r, w, b, prenorm=True, weight_offset=1.0),
               lambda x, r, w, b: rf.add_rms_norm(x, r, w, 1e-5, prenorm=True, weight_offset=-0.5)):
        assert torch.autograd.gradcheck(fn, (x, r, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_offset(device):
    x, r, w, b = _data(torch.bfloat16, device)
    args = (x, r, w, b, 1e-5, False, True, torch.float32, 1.0, True)
    torch.library.opcheck(torch.ops.residual_fused.add_norm_fwd, args)
    y, s, rstd, mean = torch.ops.residual_fused.add_norm_fwd(*args)
    bwd = (torch.randn_like(y), torch.randn_like(s), s, rstd, w, b, False, False, torch.float32, 1.0, mean)
    torch.library.opcheck(torch.ops.residual_fused.add_norm_bwd, bwd)


def test_compiled_kernels_and_reference_agree_bitwise_on_cpu():
    if not rf.cpu_kernels_available():
        pytest.skip("the CPU kernels are not built")
    x, r, w, b = _data(torch.float32, "cpu", rows=5, hidden=33)
    got = torch.ops.residual_fused.add_norm_fwd(x, r, w, b, 1e-5, False, True, torch.float32, 1.0)
    want = reference.forward(x, r, w, b, 1e-5, False, 1.0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_offset_zero_keeps_a_negative_zero_weight():
    """Without an offset nothing is added: a -0.0 weight element still gives -0.0 * x."""
    x = torch.ones(2, 4)
    w = torch.tensor([-0.0, 1.0, -0.0, 2.0])
    for fn in (rf.add_rms_norm, rf.reference.add_rms_norm):
        y = fn(x, None, w, 1e-5)
        assert math.copysign(1.0, y[0, 0].item()) == -1.0


def test_module_keeps_the_raw_weight_and_starts_at_one():
    norm = rf.FusedAddRMSNorm(8, eps=1e-6, prenorm=True, weight_offset=1.0)
    assert torch.equal(norm.weight, torch.zeros(8))  # used: 1 + 0
    assert "weight_offset=1.0" in repr(norm)
    assert list(norm.state_dict()) == ["weight"]
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    y, s = norm(x, r)
    torch.testing.assert_close(y, rf.add_rms_norm(x, r, torch.ones(8), 1e-6))
    ln = rf.FusedAddNorm(8, weight_offset=1.0)
    assert torch.equal(ln.weight, torch.zeros(8)) and torch.equal(ln.bias, torch.zeros(8))


def test_errors_name_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight_offset must be a finite number, got inf"):
        rf.add_rms_norm(x, None, torch.ones(8), weight_offset=math.inf)
    with pytest.raises(ValueError, match="weight_offset is 1.0, but there is no weight to add it to"):
        rf.add_layer_norm(x, None, None, weight_offset=1.0)
    with pytest.raises(ValueError, match="weight_offset must be a finite number, got True"):
        rf.add_rms_norm(x, None, torch.ones(8), weight_offset=True)
    with pytest.raises(ValueError, match="weight_offset of FusedAddRMSNorm .* no weight to add it to"):
        rf.FusedAddRMSNorm(8, elementwise_affine=False, weight_offset=1.0)
    with pytest.raises(RuntimeError, match="weight_offset: an offset is added to the weight, so it needs a weight"):
        torch.ops.residual_fused.add_norm_fwd(x, None, None, None, 1e-5, True, False, torch.float32, 1.0)
    with pytest.raises(RuntimeError, match="weight_offset must be finite"):
        torch.ops.residual_fused.add_norm_fwd(x, None, torch.ones(8), None, 1e-5, True, False, torch.float32,
                                              math.nan)


def test_numpy_offset_and_copying_constructors():
    np = pytest.importorskip("numpy")
    x = torch.randn(3, 8)
    torch.testing.assert_close(rf.add_rms_norm(x, None, torch.zeros(8), weight_offset=np.float32(1.0)),
                               rf.add_rms_norm(x, None, torch.ones(8)))
    with pytest.raises(ValueError, match="from_layer_norm copies a nn.LayerNorm, whose weight is used as it is"):
        rf.FusedAddNorm.from_layer_norm(torch.nn.LayerNorm(8), weight_offset=1.0)
    with pytest.raises(ValueError, match="from_rms_norm copies a nn.RMSNorm"):
        rf.FusedAddRMSNorm.from_rms_norm(torch.nn.RMSNorm(8), weight_offset=1.0)
