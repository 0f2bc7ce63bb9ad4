"""torch.compile(fullgraph=True) traces forward + backward with no graph break."""

import pytest
import torch

import residual_fused as rf
from conftest import DEVICES
from oracle import Case, make_inputs, run

COMPILE_CASES = [
    Case(shape=(4, 9, 64), x=torch.float32, residual=torch.float32, weight=torch.float32,
         bias=torch.float32, prenorm=prenorm, memory_efficient=mem)
    for prenorm in (False, True) for mem in (False, True)
] + [
    Case(rms=True, shape=(4, 9, 64), x=torch.bfloat16, residual=torch.float32,
         weight=torch.float32, bias=None, prenorm=True, residual_dtype=torch.float32),
    Case(shape=(4, 8, 16), normalized_ndim=2, x=torch.float32, residual=None,
         weight=torch.float32, bias=torch.float32),
]


def _compiled_matches_eager(case, device, backend):
    inputs, grads = make_inputs(case, device)
    expected = run("ours", case, inputs, grads)
    fn = rf.add_rms_norm if case.rms else rf.add_layer_norm
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)

    leaves = {k: (None if v is None else v.detach().clone().requires_grad_())
              for k, v in inputs.items()}
    args = [leaves["x"], leaves["residual"], leaves["weight"]] + ([] if case.rms else [leaves["bias"]])
    out = compiled(*args, case.eps, prenorm=case.prenorm, residual_dtype=case.residual_dtype,
                   memory_efficient=case.memory_efficient, normalized_shape=case.normalized_shape)
    outs = list(out) if case.prenorm else [out]
    ups = [grads["y"]] + ([grads["residual_out"]] if case.prenorm else [])
    torch.autograd.backward(outs, ups)
    torch.testing.assert_close(outs[0], expected["y"])
    if case.prenorm:
        torch.testing.assert_close(outs[1], expected["residual_out"])
    for name, key in (("dx", "x"), ("dresidual", "residual"), ("dweight", "weight"),
                      ("dbias", "bias")):
        if leaves[key] is not None:
            torch.testing.assert_close(leaves[key].grad, expected[name])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", COMPILE_CASES, ids=str)
def test_compile_fullgraph_aot_eager(device, case):
    _compiled_matches_eager(case, device, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_inductor(device):
    _compiled_matches_eager(COMPILE_CASES[1], device, "inductor")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_module_in_a_block(device):
    block = torch.nn.ModuleDict({
        "proj": torch.nn.Linear(32, 32), "norm": rf.FusedAddRMSNorm(32, prenorm=True),
    }).to(device)

    def step(h, residual):
        y, residual = block["norm"](block["proj"](h), residual)
        return (y * residual).sum()

    h = torch.randn(8, 32, device=device)
    r = torch.randn(8, 32, device=device)
    expected = step(h, r)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(h, r)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert block["norm"].weight.grad is not None
