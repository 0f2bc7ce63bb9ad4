"""The inference forms: ``out=`` / ``residual_out=`` buffers and the in-place
``add_rms_norm_`` / ``add_layer_norm_`` (vLLM's ``fused_add_rms_norm``).

Each writes exactly what the out-of-place call returns (bitwise: the same kernel),
refuses inputs that need a gradient, and refuses buffers that would read what it
wrote (a partial overlap with an input or with the other buffer), with the rule in the
message and nothing the caller passed modified. The ops are checked on the compiled
kernels (where built) and on the reference, which must refuse with the same words.
"""

import itertools
import random

import pytest
import torch

import residual_fused as rf
from conftest import DEVICES
from residual_fused import ops

OPS = torch.ops.residual_fused
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _cases(n=24, seed=0):
    """Random points of the space the forms accept: norm, dtype of each tensor, hidden
    sizes from 1 to past a vector's boundary, rows 0 to 9, affine or not, an offset."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        rms = k % 2 == 0
        x = rng.choice(DTYPES)
        residual = rng.choice(DTYPES)
        weight = rng.choice((None,) + DTYPES)
        bias = None if rms else rng.choice((None,) + DTYPES)
        hidden = rng.choice((1, 7, 8, 64, 129, 1000, 4100))
        rows = rng.choice((0, 1, 3, 9))
        offset = rng.choice((0.0, 1.0)) if weight is not None else 0.0
        out.append((rms, x, residual, weight, bias, rows, hidden, offset))
    return out


CASES = _cases()


def _case_id(case):
    rms, x, r, w, b, rows, hidden, offset = case
    name = lambda t: "none" if t is None else str(t).replace("torch.", "")  # noqa: E731
    return (f"{'rms' if rms else 'ln'}-x{name(x)}-r{name(r)}-w{name(w)}-b{name(b)}-{rows}x{hidden}"
            f"{'-off' if offset else ''}")


def _inputs(case, device):
    rms, x, r, w, b, rows, hidden, offset = case
    g = torch.Generator().manual_seed(hidden * 31 + rows)
    t = lambda shape, dt: None if dt is None else (torch.randn(*shape, generator=g) + 0.5).to(dt).to(device)  # noqa: E731
    return t((rows, hidden), x), t((rows, hidden), r), t((hidden,), w), t((hidden,), b)


def _functional(rms, x, residual, weight, bias, offset, **kw):
    if rms:
        return rf.add_rms_norm(x, residual, weight, 1e-6, weight_offset=offset, **kw)
    return rf.add_layer_norm(x, residual, weight, bias, 1e-5, weight_offset=offset, **kw)


def _inplace(rms, x, residual, weight, bias, offset):
    if rms:
        return rf.add_rms_norm_(x, residual, weight, 1e-6, weight_offset=offset)
    return rf.add_layer_norm_(x, residual, weight, bias, 1e-5, weight_offset=offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_out_and_inplace_write_what_the_call_returns(device, case):
    rms, *_, offset = case
    x, residual, weight, bias = _inputs(case, device)
    want_y, want_res = _functional(rms, x, residual, weight, bias, offset, prenorm=True)
    with torch.no_grad():
        out, res_out = torch.full_like(x, float("nan")), torch.full_like(residual, float("nan"))
        got = _functional(rms, x, residual, weight, bias, offset, prenorm=True, out=out, residual_out=res_out)
        assert got[0] is out and got[1] is res_out
        assert torch.equal(out, want_y) and torch.equal(res_out, want_res)
        # post-norm with out= only
        post = _functional(rms, x, residual, weight, bias, offset, out=torch.empty_like(x))
        assert torch.equal(post, want_y)
        # in place, and out= given the inputs themselves
        for form in ("inplace", "out=inputs"):
            xi, ri = x.clone(), residual.clone()
            if form == "inplace":
                got = _inplace(rms, xi, ri, weight, bias, offset)
            else:
                got = _functional(rms, xi, ri, weight, bias, offset, prenorm=True, out=xi, residual_out=ri)
            assert got[0] is xi and got[1] is ri
            assert torch.equal(xi, want_y) and torch.equal(ri, want_res), form


@pytest.mark.parametrize("path", ["compiled", "reference"])
@pytest.mark.parametrize("case", CASES[:8], ids=_case_id)
def test_the_ops_agree_on_both_paths(path, case):
    """The ops themselves: the compiled CPU kernels and the reference write the same
    buffers the out-of-place op returns."""
    if path == "compiled" and not rf.cpu_kernels_available():
        pytest.skip("the compiled CPU kernels are not built")
    rms, *_, offset = case
    x, residual, weight, bias = _inputs(case, "cpu")
    y, res, _, _ = OPS.add_norm_fwd(x, residual, weight, bias, 1e-5, rms, True, residual.dtype, offset)
    fwd_out = OPS.add_norm_fwd_out if path == "compiled" else ops._add_norm_fwd_out_reference
    fwd_inplace = OPS.add_norm_fwd_inplace if path == "compiled" else ops._add_norm_fwd_inplace_reference
    out, res_out = torch.empty_like(x), torch.empty_like(residual)
    fwd_out(x, residual, weight, bias, 1e-5, rms, offset, out, res_out)
    xi, ri = x.clone(), residual.clone()
    fwd_inplace(xi, ri, weight, bias, 1e-5, rms, offset)
    tol = {} if path == "compiled" else {"rtol": 2e-2, "atol": 2e-2}  # the reference rounds differently
    for got in ((out, res_out), (xi, ri)):
        torch.testing.assert_close(got[0], y, **tol)
        torch.testing.assert_close(got[1], res, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_views_touches_only_the_view(device):
    big_x, big_r = torch.randn(8, 64, device=device), torch.randn(8, 64, device=device)
    before_x, before_r = big_x.clone(), big_r.clone()
    w = torch.randn(64, device=device)
    want_y, want_r = rf.add_rms_norm(big_x[2:5], big_r[2:5], w, 1e-6, prenorm=True)
    with torch.no_grad():
        rf.add_rms_norm_(big_x[2:5], big_r[2:5], w, 1e-6)
    assert torch.equal(big_x[2:5], want_y) and torch.equal(big_r[2:5], want_r)
    for rows in (slice(0, 2), slice(5, 8)):
        assert torch.equal(big_x[rows], before_x[rows]) and torch.equal(big_r[rows], before_r[rows])
    # normalized_shape over two dims: folded as views, so the result lands in x
    x3, r3 = torch.randn(4, 2, 32, device=device), torch.randn(4, 2, 32, device=device)
    w3 = torch.randn(2, 32, device=device)
    want = rf.add_layer_norm(x3, r3, w3, None, prenorm=True)
    with torch.no_grad():
        rf.add_layer_norm_(x3, r3, w3)
    assert torch.equal(x3, want[0]) and torch.equal(r3, want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_modules_take_the_inference_forms(device):
    norm = rf.FusedAddRMSNorm(48, eps=1e-6, prenorm=True, device=device)
    x, r = torch.randn(3, 48, device=device), torch.randn(3, 48, device=device)
    want = norm(x, r)
    with torch.no_grad():
        out, res_out = torch.empty_like(x), torch.empty_like(r)
        assert norm(x, r, out=out, residual_out=res_out) == (out, res_out)
        xi, ri = x.clone(), r.clone()
        norm.forward_inplace(xi, ri)
    for got in ((out, res_out), (xi, ri)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ln = rf.FusedAddNorm(48, prenorm=True, device=device)
    want = ln(x, r)
    with torch.no_grad():
        xi, ri = x.clone(), r.clone()
        ln.forward_inplace(xi, ri)
    assert torch.equal(xi, want[0]) and torch.equal(ri, want[1])


# ---- refusals ---------------------------------------------------------------------------


def _snapshot(*tensors):
    return [None if t is None else t.clone() for t in tensors]


def _unchanged(before, *tensors):
    for b, t in zip(before, tensors):
        if t is not None:
            assert torch.equal(b, t) or (b.isnan().any() and torch.equal(b.isnan(), t.isnan()))


def test_inference_forms_refuse_gradients():
    x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16, requires_grad=True)
    before = _snapshot(x, r)
    with pytest.raises(RuntimeError, match=r"add_rms_norm_: a tensor requires grad.*torch.no_grad\(\)"):
        rf.add_rms_norm_(x, r, w)
    with pytest.raises(RuntimeError, match=r"out=/residual_out=: a tensor requires grad"):
        rf.add_layer_norm(x, r, w, out=torch.empty_like(x))
    for op, args in ((OPS.add_norm_fwd_inplace, (x, r, w, None, 1e-5, True, 0.0)),
                     (OPS.add_norm_fwd_out, (x, r, w, None, 1e-5, True, 0.0, torch.empty_like(x), None))):
        with pytest.raises(RuntimeError, match=r"a tensor requires grad: the out= and in-place forms"):
            op(*args)
    _unchanged(before, x, r)
    with torch.no_grad():  # where no gradient is recorded, the same calls run
        rf.add_rms_norm_(x, r, w)


def test_functional_rules():
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    before = _snapshot(x, r)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"residual_out: only the pre-norm form \(prenorm=True\)"):
            rf.add_rms_norm(x, r, residual_out=torch.empty_like(r))
        with pytest.raises(ValueError, match=r"residual_out: dtype torch.float16 must be the new residual's, "
                                             r"torch.float32"):
            rf.add_rms_norm(x, r, prenorm=True, residual_out=torch.empty_like(r, dtype=torch.float16))
        with pytest.raises(ValueError, match=r"residual: add_rms_norm_ updates the residual stream in place"):
            rf.add_rms_norm_(x, None)
        with pytest.raises(TypeError, match=r"out must be a torch.Tensor, got list"):
            rf.add_rms_norm(x, r, out=[])
        # normalized_shape over two dims: the buffers fold as views or not at all
        strided = torch.empty(2, 16, 2).transpose(1, 2)
        assert not strided.is_contiguous()
        with pytest.raises(RuntimeError, match=r"out: must be contiguous"):
            rf.add_layer_norm(x.view(2, 2, 16), r.view(2, 2, 16), normalized_shape=(2, 16), out=strided)
        with pytest.raises(RuntimeError, match=r"out: shape \[2, 2, 8\] must equal x's \[2, 2, 16\]"):
            rf.add_layer_norm(x.view(2, 2, 16), r.view(2, 2, 16), normalized_shape=(2, 16),
                              out=torch.empty(2, 2, 8))
    _unchanged(before, x, r)


_OP_PATHS = ["compiled", "reference"]


def _out_op(path):
    return OPS.add_norm_fwd_out if path == "compiled" else ops._add_norm_fwd_out_reference


def _inplace_op(path):
    return OPS.add_norm_fwd_inplace if path == "compiled" else ops._add_norm_fwd_inplace_reference


@pytest.mark.parametrize("path", _OP_PATHS)
def test_buffer_rules(path):
    """Each buffer: x's shape, contiguous, out of x's dtype, and either exactly an input
    or clear of all of them and of the other buffer."""
    if path == "compiled" and not rf.cpu_kernels_available():
        pytest.skip("the compiled CPU kernels are not built")
    big = torch.randn(4, 64)
    x, r, w, b = big[:, :16], torch.randn(4, 16), torch.randn(16), torch.randn(16)
    xc = torch.randn(4, 16)
    fwd = _out_op(path)
    cases = [
        (dict(out=torch.empty(4, 16, dtype=torch.float16)), r"out: dtype must be x's"),
        (dict(out=torch.empty(4, 15)), r"out: shape \[4, 15\] must equal x's \[4, 16\]"),
        (dict(out=torch.empty(16, 4).t()), r"out: must be contiguous \(the kernels write whole rows densely\)"),
        (dict(out=torch.empty(4, 16), residual_out=torch.empty(4, 16, dtype=torch.int32)),
         r"residual_out: dtype .*(not supported|int).*float16, bfloat16, float32 or float64"),
        (dict(x=x, out=big[1:].reshape(-1)[:64].view(4, 16)), r"out overlaps x without being x itself"),
        (dict(out=torch.cat([w, w, w, w]).view(4, 16)), None),  # a copy of the weight: no overlap
        (dict(out=w.expand(4, 16).contiguous()), None),
        (dict(out=torch.empty(4, 16), residual_out=r.view(-1)[1:].view(1, 63)[:, :16].expand(4, 16)),
         r"residual_out: must be contiguous"),
    ]
    pool = torch.empty(128)
    cases += [
        (dict(out=pool[:64].view(4, 16), residual_out=pool[32:96].view(4, 16)),
         r"out and residual_out overlap: the two outputs need separate memory"),
    ]
    wide = torch.empty(80)
    w_view = wide[:16]
    cases += [(dict(out=wide[:64].view(4, 16), weight=w_view), r"out overlaps weight without being weight itself")]
    for kw, message in cases:
        weight, xin = kw.pop("weight", w), kw.pop("x", xc)
        args = (xin, r, weight, b, 1e-5, False, 0.0, kw["out"], kw.get("residual_out"))
        before = _snapshot(xin, r, weight, b)
        if message is None:
            fwd(*args)
            continue
        with pytest.raises(RuntimeError, match=message):
            fwd(*args)
        _unchanged(before, xin, r, weight, b)
    # buffers that overlap some rows of a strided x
    with pytest.raises(RuntimeError, match=r"residual_out overlaps x without being x itself"):
        fwd(x, r, w, b, 1e-5, False, 0.0, torch.empty(4, 16), big.view(-1)[8:72].view(4, 16))
    with pytest.raises(RuntimeError, match=r"out overlaps x without being x itself"):
        fwd(x, r, w, b, 1e-5, False, 0.0, big.view(-1)[16:80].view(4, 16), None)


@pytest.mark.parametrize("path", _OP_PATHS)
def test_inplace_rules(path):
    if path == "compiled" and not rf.cpu_kernels_available():
        pytest.skip("the compiled CPU kernels are not built")
    fwd = _inplace_op(path)
    x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    strided = torch.randn(4, 32)[:, :16]
    before = _snapshot(x, r, strided)
    with pytest.raises(RuntimeError, match=r"x: must be contiguous"):
        fwd(strided, r, w, None, 1e-5, True, 0.0)
    with pytest.raises(RuntimeError, match=r"residual: must be contiguous"):
        fwd(x, strided, w, None, 1e-5, True, 0.0)
    with pytest.raises(RuntimeError, match=r"x and residual overlap: the two outputs need separate memory"):
        fwd(x, x, w, None, 1e-5, True, 0.0)
    with pytest.raises(RuntimeError, match=r"x overlaps residual without being residual itself"):
        both = torch.randn(80)
        fwd(both[:64].view(4, 16), both[16:80].view(4, 16), w, None, 1e-5, True, 0.0)
    with pytest.raises(RuntimeError, match=r"bias: RMSNorm has no bias"):
        fwd(x, r, w, torch.randn(16), 1e-5, True, 0.0)
    with pytest.raises(RuntimeError, match=r"weight_offset: an offset is added to the weight"):
        fwd(x, r, None, None, 1e-5, True, 1.0)
    _unchanged(before, x, r, strided)


@pytest.mark.parametrize("device", DEVICES)
def test_written_tensors_get_a_new_version(device):
    """As after a torch in-place op: each tensor the forms write gets a new version, so
    a backward that saved one before refuses instead of using the new values."""
    x, r, w = torch.randn(3, 16, device=device), torch.randn(3, 16, device=device), torch.randn(16, device=device)
    out, res_out = torch.empty_like(x), torch.empty_like(r)
    versions = [t._version for t in (x, r, out, res_out)]
    with torch.no_grad():
        rf.add_rms_norm(x, r, w, prenorm=True, out=out, residual_out=res_out)
    assert out._version > versions[2] and res_out._version > versions[3]
    assert (x._version, r._version) == tuple(versions[:2])  # inputs only read
    with torch.inference_mode():  # ordinary tensors written in inference mode count too
        rf.add_layer_norm_(x, r, w)
    assert x._version > versions[0] and r._version > versions[1]
    for path in ("in place", "out="):
        a = torch.randn(3, 16, device=device, requires_grad=True)
        saved = torch.randn(3, 16, device=device)
        loss = (a * saved).sum()  # saves `saved` for the backward
        with torch.no_grad():
            if path == "in place":
                rf.add_rms_norm_(saved, torch.randn(3, 16, device=device), w)
            else:
                rf.add_rms_norm(torch.randn(3, 16, device=device), None, w, out=saved)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_compile_traces_the_inplace_form():
    """torch.compile functionalizes the in-place op (its schema declares what it writes)."""
    def step(x, r, w):
        rf.add_rms_norm_(x, r, w, 1e-6)
        return x * 2, r

    x, r, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    want_y, want_r = rf.add_rms_norm(x, r, w, 1e-6, prenorm=True)
    with torch.no_grad():
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(x.clone(), r.clone(), w)
    torch.testing.assert_close(got[0], want_y * 2)
    torch.testing.assert_close(got[1], want_r)


def test_every_dtype_pair_in_place():
    """x and residual of every pair of supported dtypes (the residual keeps its own)."""
    for xd, rd in itertools.product(DTYPES, DTYPES):
        x, r, w = torch.randn(3, 40).to(xd), torch.randn(3, 40).to(rd), torch.randn(40)
        want = rf.add_rms_norm(x, r, w, 1e-6, prenorm=True)
        with torch.no_grad():
            xi, ri = x.clone(), r.clone()
            rf.add_rms_norm_(xi, ri, w, 1e-6)
        assert torch.equal(xi, want[0]) and torch.equal(ri, want[1]), (xd, rd)
        assert ri.dtype == rd and xi.dtype == xd
