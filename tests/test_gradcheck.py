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


_WITHOUT_C = r"""
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "residual_fused._C" else find_spec(name, *a)
import torch
import residual_fused as rf
from residual_fused import ops
assert ops._c_module is None and ops._python_autograd is not None, "the Python autograd is not the one running"
x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
r = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
w = torch.randn(6, dtype=torch.float64, requires_grad=True)
b = torch.randn(6, dtype=torch.float64, requires_grad=True)
for prenorm in (False, True):
    assert torch.autograd.gradcheck(lambda x, r, w, b: rf.add_layer_norm(x, r, w, b, prenorm=prenorm), (x, r, w, b))
    assert torch.autograd.gradcheck(lambda x, r, w: rf.add_rms_norm(x, r, w, prenorm=prenorm, memory_efficient=True),
                                    (x, r, w))
(g,) = torch.autograd.grad(rf.add_layer_norm(x, r).pow(2).sum(), x, create_graph=True)
try:
    g.sum().backward()
    raise SystemExit("double backward did not raise")
except RuntimeError as err:
    assert "double backward" in str(err), err
try:
    rf.add_rms_norm_(torch.randn(2, 6), torch.randn(2, 6), w)
    raise SystemExit("the in-place form took a tensor that requires grad")
except RuntimeError as err:
    assert "requires grad" in str(err), err
saved = torch.randn(2, 6, dtype=torch.float64)
loss = (x[:2] * saved).sum()
with torch.no_grad():
    v = saved._version
    rf.add_rms_norm_(saved, torch.randn(2, 6, dtype=torch.float64), w)
assert saved._version > v, "the in-place form left the version count"
try:
    loss.backward()
    raise SystemExit("a backward used a tensor the in-place form had overwritten")
except RuntimeError as err:
    assert "modified by an inplace operation" in str(err), err
print("ok")
"""


def test_python_autograd_where_the_compiled_library_is_absent():
    """Without _C (no compiler at install, a torch it was not built for) the op add_norm's
    autograd is AddNormFunction, registered from Python: gradients, the double-backward
    refusal, the inference forms' rule and their version counts hold there too."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RESIDUAL_FUSED_JIT": "0", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_C], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
