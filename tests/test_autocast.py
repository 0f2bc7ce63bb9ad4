"""Under torch.autocast the fused norms do not cast: y keeps x's dtype.

The policy users of mixed precision expect: bf16/fp16 activations in, the same
dtype out, fp32 parameters read as they are (no copies), statistics in fp32. So the
result under autocast is bitwise the result without it.
"""

import pytest
import torch

import residual_fused as rf
from conftest import DEVICES


def _autocast(device, dtype):
    return torch.autocast(torch.device(device).type, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [rf.FusedAddNorm, rf.FusedAddRMSNorm])
def test_autocast_keeps_activation_dtype_and_results(device, dtype, cls):
    if device == "cpu" and dtype == torch.float16 and not hasattr(torch, "get_autocast_dtype"):
        pytest.skip("CPU autocast with float16 needs a newer torch")
    torch.manual_seed(0)
    norm = cls(256, prenorm=True, residual_in_fp32=True).to(device)  # fp32 parameters
    with torch.no_grad():
        norm.weight.copy_(torch.rand(256) + 0.5)
    x = torch.randn(8, 256, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(8, 256, device=device, requires_grad=True)  # fp32 residual stream

    def run():
        for t in (x, r, norm.weight):
            t.grad = None
        y, res = norm(x, r)
        (y.float().square().sum() + res.sum()).backward()
        return y, res, x.grad, r.grad, norm.weight.grad

    with _autocast(device, dtype):
        under = run()
    plain = run()
    assert under[0].dtype == dtype and under[1].dtype == torch.float32
    assert under[2].dtype == dtype and under[4].dtype == torch.float32
    for a, b in zip(under, plain):
        assert torch.equal(a, b)
    # fp32 activations stay fp32 under autocast too (nothing is cast down)
    with _autocast(device, dtype):
        assert norm(x.detach().float(), r)[0].dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_difference_from_nn_layer_norm_under_cuda_autocast():
    """Documented in docs/usage.md: torch's layer_norm is on CUDA autocast's float32 list."""
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.nn.LayerNorm(64).cuda()(x).dtype == torch.float32
        assert rf.FusedAddNorm(64).cuda()(x).dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_reduce_overhead_model():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(512, 512),
                                 "norm": rf.FusedAddRMSNorm(512, prenorm=True)}).cuda()

    def step(h, r):
        y, r = model["norm"](model["lin"](h), r)
        return y, r

    h, r = torch.randn(16, 512, device="cuda"), torch.randn(16, 512, device="cuda")
    with torch.no_grad():
        expected = step(h, r)
        compiled = torch.compile(step, mode="reduce-overhead")
        for _ in range(3):  # warm-up, capture, replay
            got = compiled(h, r)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
