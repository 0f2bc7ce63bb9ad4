"""torch.library.opcheck on the ops: schema, fake kernels, dispatch, AOT tracing."""

import pytest
import torch

from conftest import DEVICES
from oracle import Case, flag_cases, make_inputs

OPS = torch.ops.residual_fused

CASES = [c for c in flag_cases(shape=(5, 24), x=torch.float32) if not c.row_strided][::3] + [
    Case(shape=(5, 24), x=torch.bfloat16, residual=torch.float32, weight=torch.float32,
         bias=torch.float32, prenorm=True, residual_dtype=torch.float32, row_strided=True),
    Case(rms=True, shape=(2, 3, 40), x=torch.float16, residual=torch.float16,
         weight=torch.float32, bias=None, prenorm=True),
    Case(shape=(0, 16), x=torch.float32, residual=torch.float32, weight=torch.float32,
         bias=torch.float32),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck(device, case):
    t, grads = make_inputs(case, device)
    x, residual, weight, bias = t["x"], t["residual"], t["weight"], t["bias"]
    out_dtype = case.residual_dtype or case.residual or case.x
    store = case.prenorm or (residual is not None and not case.memory_efficient)
    fwd_args = (x, residual, weight, bias, case.eps, case.rms, store, out_dtype)
    torch.library.opcheck(OPS.add_norm_fwd, fwd_args)
    # the differentiable op the functional API calls (its autograd in C++ with _C)
    torch.library.opcheck(OPS.add_norm, (x, residual, weight, bias, case.eps, case.rms, case.prenorm, out_dtype,
                                         case.memory_efficient))

    store_mean = not case.rms and not case.memory_efficient
    torch.library.opcheck(OPS.add_norm_fwd, fwd_args + (0.0, store_mean))
    y, residual_out, rstd, mean = OPS.add_norm_fwd(*fwd_args, 0.0, store_mean)
    saved = y if case.memory_efficient else (residual_out if store else x)
    dresidual_dtype = residual.dtype if residual is not None and residual.dtype != x.dtype else None
    bwd_args = (grads["y"], grads.get("residual_out"), saved, rstd, weight, bias, case.rms,
                case.memory_efficient, dresidual_dtype)
    torch.library.opcheck(OPS.add_norm_bwd, bwd_args)
    if store_mean:  # with the forward's mean, as autograd calls it
        torch.library.opcheck(OPS.add_norm_bwd, bwd_args + (0.0, mean))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in CASES if c.residual is not None], ids=str)
def test_opcheck_inference_forms(device, case):
    """The out= and in-place ops: what they write is declared in their schemas."""
    t, _ = make_inputs(case, device)
    x, residual, weight, bias = (None if v is None else v.detach() for v in
                                 (t["x"], t["residual"], t["weight"], t["bias"]))
    out = torch.empty(x.shape, dtype=x.dtype, device=device)
    residual_out = torch.empty(x.shape, dtype=residual.dtype, device=device)
    torch.library.opcheck(OPS.add_norm_fwd_out,
                          (x, residual, weight, bias, case.eps, case.rms, 0.0, out, residual_out))
    torch.library.opcheck(OPS.add_norm_fwd_out, (x, residual, weight, bias, case.eps, case.rms, 0.0, out, None))
    torch.library.opcheck(OPS.add_norm_fwd_inplace, (x.contiguous().clone(), residual.contiguous().clone(),
                                                     weight, bias, case.eps, case.rms, 0.0))
