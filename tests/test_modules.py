"""FusedAddNorm / FusedAddRMSNorm are drop-in for nn.LayerNorm / nn.RMSNorm."""

import pytest
import torch
from torch import nn

import residual_fused as rf
from conftest import DEVICES

LN_CONFIGS = [
    dict(normalized_shape=64),
    dict(normalized_shape=(32, 16), eps=1e-6),
    dict(normalized_shape=48, bias=False),
    dict(normalized_shape=48, elementwise_affine=False),
]
RMS_CONFIGS = [
    dict(normalized_shape=64),
    dict(normalized_shape=(8, 6), eps=1e-6),
    dict(normalized_shape=48, elementwise_affine=False),
]


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


def _shape(module):
    return (3, 5) + tuple(module.normalized_shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", LN_CONFIGS, ids=str)
def test_layer_norm_drop_in(device, cfg):
    ln = _randomize(nn.LayerNorm(**cfg, device=device))
    fused = rf.FusedAddNorm(**cfg, device=device)
    assert fused.state_dict().keys() == ln.state_dict().keys()
    fused.load_state_dict(ln.state_dict())
    x, r = torch.randn(_shape(ln), device=device), torch.randn(_shape(ln), device=device)
    torch.testing.assert_close(fused(x, r), ln(x + r))
    torch.testing.assert_close(fused(x), ln(x))
    back = nn.LayerNorm(**cfg, device=device)
    back.load_state_dict(fused.state_dict())
    torch.testing.assert_close(back(x + r), ln(x + r), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", RMS_CONFIGS, ids=str)
def test_rms_norm_drop_in(device, cfg):
    norm = _randomize(nn.RMSNorm(**cfg, device=device))
    fused = rf.FusedAddRMSNorm(**cfg, device=device)
    assert fused.state_dict().keys() == norm.state_dict().keys()
    fused.load_state_dict(norm.state_dict())
    x, r = torch.randn(_shape(norm), device=device), torch.randn(_shape(norm), device=device)
    torch.testing.assert_close(fused(x, r), norm(x + r))
    back = nn.RMSNorm(**cfg, device=device)
    back.load_state_dict(fused.state_dict())
    torch.testing.assert_close(back(x + r), norm(x + r), rtol=0, atol=0)


def test_initialisation_and_repr_match_torch():
    ln, fused = nn.LayerNorm((4, 6), eps=1e-6), rf.FusedAddNorm((4, 6), eps=1e-6, prenorm=True)
    for name in ("weight", "bias"):
        assert torch.equal(getattr(ln, name), getattr(fused, name))
    assert repr(fused) == ("FusedAddNorm((4, 6), eps=1e-06, elementwise_affine=True, bias=True, "
                           "prenorm=True)")
    rms = rf.FusedAddRMSNorm(8)
    assert rms.eps is None and torch.equal(rms.weight, torch.ones(8))
    assert repr(rms) == "FusedAddRMSNorm((8,), eps=None, elementwise_affine=True)"
    fused.weight.data.fill_(3.0)
    fused.reset_parameters()
    assert torch.equal(fused.weight, ln.weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_from_layer_norm_keeps_everything(device, dtype):
    for cfg in LN_CONFIGS:
        ln = _randomize(nn.LayerNorm(**cfg, device=device, dtype=dtype))
        fused = rf.FusedAddNorm.from_layer_norm(ln, prenorm=True, residual_in_fp32=True)
        assert fused.normalized_shape == ln.normalized_shape and fused.eps == ln.eps
        assert fused.elementwise_affine == ln.elementwise_affine
        assert (fused.bias is None) == (ln.bias is None)
        for p, q in zip(fused.parameters(), ln.parameters()):
            assert p.device == q.device and p.dtype == q.dtype and torch.equal(p, q)
            assert p.data_ptr() != q.data_ptr()
        assert fused.prenorm and fused.residual_in_fp32


@pytest.mark.parametrize("device", DEVICES)
def test_from_rms_norm_keeps_everything(device):
    for cfg in RMS_CONFIGS:
        norm = _randomize(nn.RMSNorm(**cfg, device=device, dtype=torch.bfloat16))
        fused = rf.FusedAddRMSNorm.from_rms_norm(norm, memory_efficient=True)
        assert fused.normalized_shape == norm.normalized_shape and fused.eps == norm.eps
        for p, q in zip(fused.parameters(), norm.parameters()):
            assert p.device == q.device and p.dtype == q.dtype and torch.equal(p, q)
        assert fused.memory_efficient


@pytest.mark.parametrize("device", DEVICES)
def test_prenorm_module_and_fp32_residual(device):
    norm = _randomize(rf.FusedAddNorm(64, prenorm=True, residual_in_fp32=True, device=device,
                                      dtype=torch.bfloat16))
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    r = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    y, residual_out = norm(x, r)
    assert y.dtype == torch.bfloat16 and residual_out.dtype == torch.float32
    torch.testing.assert_close(residual_out, x.float() + r.float(), rtol=0, atol=0)
    y2, residual_out2 = norm(y, residual_out)  # the next block feeds the fp32 stream back
    assert residual_out2.dtype == torch.float32 and y2.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [rf.FusedAddNorm, rf.FusedAddRMSNorm])
def test_memory_efficient_module_gives_same_gradients(device, cls):
    grads = []
    for mem in (False, True):
        torch.manual_seed(1)
        norm = cls(96, memory_efficient=mem, device=device, dtype=torch.float64)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(96) + 0.5)
        x = torch.randn(10, 96, device=device, dtype=torch.float64, requires_grad=True)
        r = torch.randn(10, 96, device=device, dtype=torch.float64, requires_grad=True)
        norm(x, r).pow(2).sum().backward()
        grads.append([x.grad, r.grad] + [p.grad for p in norm.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_dtype_and_device_kwargs():
    fused = rf.FusedAddNorm(16, device="cpu", dtype=torch.float16)
    assert fused.weight.dtype == torch.float16 and fused.bias.device.type == "cpu"
    rms = rf.FusedAddRMSNorm(16, dtype=torch.bfloat16)
    assert rms.weight.dtype == torch.bfloat16
