"""torch.autograd.gradcheck in float64 on every flag combination, CPU and CUDA."""

import dataclasses

import pytest
import torch

import residual_fused as rf
from conftest import DEVICES
from oracle import Case, flag_cases, make_inputs

TENSOR_ARGS = ("x", "residual", "weight", "bias")
CASES = list(flag_cases(shape=(3, 6), x=torch.float64)) + [
    Case(rms=rms, shape=(2, 3, 4), normalized_ndim=2, x=torch.float64, residual=torch.float64,
         weight=torch.float64, bias=None if rms else torch.float64, prenorm=True)
    for rms in (False, True)
]


def _gradcheck(case, device):
    inputs, _ = make_inputs(case, device)
    names = [n for n in TENSOR_ARGS if inputs[n] is not None]
    fn = rf.add_rms_norm if case.rms else rf.add_layer_norm

    def call(*tensors):
        t = {**inputs, **dict(zip(names, tensors))}
        args = (t["x"], t["residual"], t["weight"]) + (() if case.rms else (t["bias"],))
        return fn(*args, case.eps, prenorm=case.prenorm, memory_efficient=case.memory_efficient,
                  normalized_shape=case.normalized_shape)

    leaves = [inputs[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(call, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck(device, case):
    _gradcheck(case, device)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp32_residual_stream(device):
    case = Case(shape=(3, 6), x=torch.float64, residual=torch.float64, weight=torch.float64,
                bias=torch.float64, prenorm=True)
    _gradcheck(dataclasses.replace(case, residual_dtype=torch.float64), device)


def test_double_backward_is_refused():
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    y = rf.add_layer_norm(x, torch.randn(2, 5, dtype=torch.float64))
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiat"):
        g.sum().backward()
