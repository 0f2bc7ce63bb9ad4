"""Every Add & Norm path against the float64 reference, under the rule in oracle.py.

The grids follow the project guide: hidden sizes from 1 to 65536 (odd ones
included), rows from 1 to 4096, dtype mixes, every flag, row-strided inputs and
multi-dim normalized shapes. On CPU the element count per case is capped so the
suite stays fast; on CUDA the full grid runs.
"""

import dataclasses
import itertools

import pytest
import torch

from conftest import DEVICES
import residual_fused as rf
from oracle import Case, check_against_reference, flag_cases, make_inputs, run

HIDDEN_SIZES = (1, 8, 41, 123, 192, 768, 769, 1000, 2048, 3000, 4096, 5125, 8192, 12288,
                16384, 32768, 65536)
ROWS = (1, 7, 83, 4096)
MAX_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 25}



def _shape_params():
    """(device, rows, hidden) within each device's element cap."""
    for device in DEVICES:
        name, marks = (device, ()) if isinstance(device, str) else (device.values[0], device.marks)
        for hidden, rows in itertools.product(HIDDEN_SIZES, ROWS):
            if rows * hidden <= MAX_ELEMENTS[name]:
                yield pytest.param(name, rows, hidden, marks=marks, id=f"{name}-{rows}x{hidden}")


@pytest.mark.parametrize("prenorm", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("device,rows,hidden", list(_shape_params()))
def test_shapes(device, rows, hidden, rms, prenorm):
    case = Case(rms=rms, shape=(rows, hidden), prenorm=prenorm,
                bias=None if rms else torch.bfloat16)
    check_against_reference(case, device, seed=rows * 7 + hidden)


FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MIX_CASES = [
    Case(rms=rms, shape=(83, 769), x=x, residual=res, weight=w, bias=None if rms else w,
         prenorm=prenorm, residual_dtype=rdt)
    for rms, prenorm, x, res_is_fp32, w_is_fp32, rdt in itertools.product(
        (False, True), (False, True), FLOATS, (False, True), (False, True),
        (None, torch.float32))
    for res, w in [(torch.float32 if res_is_fp32 else x, torch.float32 if w_is_fp32 else x)]
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MIX_CASES, ids=str)
def test_dtype_mixes(device, case):
    check_against_reference(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(flag_cases(shape=(83, 1000))), ids=str)
def test_flags(device, dtype, case):
    def retype(d):
        return None if d is None else dtype

    case = dataclasses.replace(case, x=dtype, residual=retype(case.residual),
                               weight=retype(case.weight), bias=retype(case.bias))
    check_against_reference(case, device)


MULTI_DIM_CASES = [
    Case(rms=rms, shape=shape, normalized_ndim=nd, prenorm=prenorm, bias=None if rms else torch.bfloat16,
         row_strided=strided)
    for rms, prenorm, strided in itertools.product((False, True), repeat=3)
    for shape, nd in [((3, 5, 32, 16), 2), ((2, 4, 5, 6), 3), ((6, 9, 41), 1)]
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MULTI_DIM_CASES, ids=str)
def test_multi_dim_and_leading_dims(device, case):
    check_against_reference(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in flag_cases(shape=(0, 64)) if not c.row_strided], ids=str)
def test_zero_rows(device, case):
    check_against_reference(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in flag_cases(shape=(5, 200)) if not c.memory_efficient],
                         ids=str)
def test_inference_path_matches_training_path(device, case):
    """Without autograd the functional API calls the forward op directly: same results."""
    inputs, grads = make_inputs(case, device)
    trained = run("ours", case, inputs, grads)
    fn = rf.add_rms_norm if case.rms else rf.add_layer_norm
    args = [inputs["x"], inputs["residual"], inputs["weight"]] + ([] if case.rms else [inputs["bias"]])
    with torch.no_grad():
        out = fn(*args, case.eps, prenorm=case.prenorm, residual_dtype=case.residual_dtype)
    outs = out if case.prenorm else (out,)
    assert torch.equal(outs[0], trained["y"])
    if case.prenorm:
        assert torch.equal(outs[1], trained["residual_out"])
