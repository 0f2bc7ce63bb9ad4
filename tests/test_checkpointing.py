"""Activation checkpointing of the ops and modules, in both of torch's modes and
under torch.compile. Non-reentrant checkpointing recomputes a saved tensor when the
backward first unpacks it and refuses a second unpack, so the autograd code must
read its saved tensors once per backward."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import residual_fused as rf

H = 24


def _inputs(with_bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, H, requires_grad=True)
    residual = torch.randn(3, 5, H, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(H)).requires_grad_()
    bias = (0.3 * torch.randn(H)).requires_grad_() if with_bias else None
    return x, residual, weight, bias


def _call(norm, prenorm, memory_efficient):
    def run(x, residual, weight, bias):
        if norm == "layer":
            out = rf.add_layer_norm(x, residual, weight, bias, prenorm=prenorm, memory_efficient=memory_efficient)
        else:
            out = rf.add_rms_norm(x, residual, weight, prenorm=prenorm, memory_efficient=memory_efficient)
        return out if prenorm else (out,)
    return run


def _loss(outputs):
    gen = torch.Generator().manual_seed(1)
    return sum((o * torch.randn(o.shape, generator=gen) / 8).sum() for o in outputs)


def _grads(fn, inputs, mode):
    for t in inputs:
        if t is not None:
            t.grad = None
    if mode is None:
        outputs = fn(*inputs)
    else:
        outputs = checkpoint(fn, *inputs, use_reentrant=mode)
    _loss(outputs).backward()
    return [None if t is None else t.grad.clone() for t in inputs]


def _same(got, want):
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.equal(g, w)


@pytest.mark.parametrize("mode", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["", "memory_efficient"])
@pytest.mark.parametrize("prenorm", [False, True], ids=["postnorm", "prenorm"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_functional_under_checkpoint(norm, prenorm, memory_efficient, mode):
    inputs = _inputs(norm == "layer")
    fn = _call(norm, prenorm, memory_efficient)
    _same(_grads(fn, inputs, mode), _grads(fn, inputs, None))


@pytest.mark.parametrize("mode", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("module", ["FusedAddNorm", "FusedAddRMSNorm"])
def test_module_under_checkpoint(module, mode):
    torch.manual_seed(0)
    norm = getattr(rf, module)(H, prenorm=True)
    with torch.no_grad():
        norm.weight.mul_(1.3)
    x, residual, _, _ = _inputs(False)

    def grads(m):
        norm.zero_grad(set_to_none=True)
        x.grad = residual.grad = None
        outputs = norm(x, residual) if m is None else checkpoint(norm, x, residual, use_reentrant=m)
        _loss(outputs).backward()
        return [x.grad.clone(), residual.grad.clone()] + [p.grad.clone() for p in norm.parameters()]

    _same(grads(mode), grads(None))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_checkpoint_inside_torch_compile(norm):
    inputs = _inputs(norm == "layer")
    fn = _call(norm, True, False)

    def step(*args):
        return checkpoint(fn, *args, use_reentrant=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for t in inputs:
        if t is not None:
            t.grad = None
    _loss(compiled(*inputs)).backward()
    got = [None if t is None else t.grad.clone() for t in inputs]
    want = _grads(fn, inputs, None)
    for g, w in zip(got, want):
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
