"""The reference itself against an independent float64 computation.

The independent side is unfused PyTorch (``x + residual``, then ``F.layer_norm`` /
``F.rms_norm``) on float64 upcasts, with autograd for the gradients. The reference
in float64 must agree to float64 precision; in the inputs' own dtypes it must meet
the same rule as every other path.
"""

import itertools

import pytest
import torch

from oracle import Case, check_against_reference, flag_cases, make_inputs, run
from test_add_norm import HIDDEN_SIZES, MIX_CASES, MULTI_DIM_CASES, ROWS

MAX_ELEMENTS = 1 << 18

GRID = (
    [Case(rms=rms, shape=(rows, h), prenorm=pre, bias=None if rms else torch.bfloat16)
     for h, rows, rms, pre in itertools.product(HIDDEN_SIZES, ROWS, (False, True), (False, True))
     if rows * h <= MAX_ELEMENTS]
    + MIX_CASES[::2]
    + list(flag_cases(shape=(83, 769)))
    + MULTI_DIM_CASES
)


@pytest.mark.parametrize("case", GRID, ids=str)
def test_reference_meets_the_rule_against_independent_fp64(case):
    check_against_reference(case, "cpu", ours="reference_native", oracle="independent")


@pytest.mark.parametrize("case", GRID[::7], ids=str)
def test_reference_fp64_equals_independent_fp64(case):
    inputs, grads = make_inputs(case, "cpu")
    ref, ind = run("reference", case, inputs, grads), run("independent", case, inputs, grads)
    assert ref.keys() == ind.keys()
    for name in ref:
        torch.testing.assert_close(ref[name], ind[name], rtol=1e-9, atol=1e-9, msg=name)
