"""The functional API's call path: the common case checked and run in one C call
(_C.functional_add_norm / functional_add_norm_), else the checks in Python, cached per
call signature, then the compiled library's plain-function entries where nothing else
would intercept the call and torch.ops where something would. Results and errors are
the same on every path."""

import math
import random

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import residual_fused as rf
from residual_fused import _validation, functional, ops

needs_c = pytest.mark.skipif(ops._c_module is None, reason="the compiled library _C is not loaded")


class _Seen(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Counting:
    """_C with its entries counted."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def counted(*args):
            self.calls.append(name)
            return fn(*args)

        return counted


@needs_c
def test_plain_tensors_take_the_direct_entry(monkeypatch):
    counting = _Counting(ops._c_module)
    monkeypatch.setattr(ops, "_c_module", counting)
    x, r, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16, requires_grad=True)
    rf.add_rms_norm(x, r, w, prenorm=True)[0].sum().backward()
    with torch.no_grad():
        rf.add_layer_norm(x, r, out=torch.empty_like(x))
        rf.add_rms_norm_(x.clone(), r.clone(), w)
        rf.FusedAddRMSNorm(16, prenorm=True).forward_inplace(x.clone(), r.clone())
    assert counting.calls == ["functional_add_norm"] * 2 + ["functional_add_norm_"] * 2
    assert w.grad is not None
    # outside the common case (here a folded normalized_shape): the checks in Python,
    # then the ops' own entries
    counting.calls.clear()
    x3, r3, w2 = torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.randn(2, 8)
    rf.add_rms_norm(x3, r3, w2, prenorm=True)
    with torch.no_grad():
        rf.add_layer_norm(x3, r3, w2, out=torch.empty_like(x3))
        rf.add_rms_norm_(x3.clone(), r3.clone(), w2)
    assert counting.calls == ["functional_add_norm", "add_norm", "functional_add_norm", "add_norm_fwd_out",
                              "functional_add_norm_", "add_norm_fwd_inplace"]


@needs_c
def test_a_torch_function_mode_sees_the_ops(monkeypatch):
    """The direct entry would skip __torch_function__: under a mode the call takes
    torch.ops, so the mode sees the op."""
    counting = _Counting(ops._c_module)
    monkeypatch.setattr(ops, "_c_module", counting)
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    want = rf.add_layer_norm(x, r, prenorm=True)
    counting.calls.clear()
    with _Seen() as seen:
        got = rf.add_layer_norm(x, r, prenorm=True)
        with torch.no_grad():
            rf.add_rms_norm_(x.clone(), r.clone())
    assert counting.calls == ["functional_add_norm", "functional_add_norm_"]  # each declined: a mode is on
    assert "residual_fused.add_norm" in seen.ops, seen.ops
    assert "residual_fused.add_norm_fwd_inplace" in seen.ops, seen.ops
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_c
def test_both_paths_raise_the_same_errors():
    x = torch.randn(2, 8)
    for call in (lambda *a: ops._c_module.add_norm(*a), lambda *a: torch.ops.residual_fused.add_norm(*a)):
        with pytest.raises(RuntimeError, match=r"eps must be non-negative, got -1"):
            call(x, None, None, None, -1.0, False, False, x.dtype, False, 0.0)
        with pytest.raises(RuntimeError, match=r"residual: shape \[2, 4\] must equal \[2, 8\]"):
            call(x, torch.randn(2, 4), None, None, 1e-5, False, False, x.dtype, False, 0.0)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        ops._c_module.add_norm([1.0], None, None, None, 1e-5, False, False, x.dtype, False, 0.0)
    with pytest.raises(TypeError, match=r"add_norm\(\) takes 10 positional arguments but 3 were given"):
        ops._c_module.add_norm(x, None, None)


def test_checks_are_cached_per_signature_and_still_refuse():
    """The Python checks (calls outside the C common case: here a folded normalized_shape)."""
    _validation._VALIDATED.clear()
    x, w = torch.randn(4, 2, 4), torch.randn(2, 4)
    rf.add_layer_norm(x, weight=w)
    rf.add_layer_norm(x, weight=w)
    assert len(_validation._VALIDATED) == 1
    with pytest.raises(ValueError, match=r"weight: shape \(7,\) must equal normalized_shape"):
        rf.add_layer_norm(x, weight=torch.randn(7), normalized_shape=(2, 4))
    with pytest.raises(ValueError, match=r"eps must be a finite non-negative number"):
        rf.add_layer_norm(x, weight=w, eps=-1.0)
    with pytest.raises(ValueError, match=r"residual is on|residual: shape"):
        rf.add_layer_norm(x, torch.randn(4, 9), w)
    assert len(_validation._VALIDATED) == 1  # failures are never cached
    # a list normalized_shape is unhashable: checked in full each time, still right
    assert torch.equal(rf.add_layer_norm(x, weight=w, normalized_shape=[2, 4]), rf.add_layer_norm(x, weight=w))
    # the cache is bounded
    for k in range(_validation._VALIDATED_MAX + 5):
        rf.add_rms_norm(torch.randn(1, 2, 4), eps=1e-6 + k * 1e-9, normalized_shape=(2, 4))
    assert len(_validation._VALIDATED) <= _validation._VALIDATED_MAX


def test_cached_signature_keeps_the_subclass_apart():
    """A tensor subclass with the same shape, dtype and device is a different signature."""
    class Sub(torch.Tensor):
        pass

    x = torch.randn(2, 8)
    args = (None, None, None, 1e-5, None, None, False, 0.0)
    _validation.validated_call(x, *args)
    key_count = len(_validation._VALIDATED)
    _validation.validated_call(x.as_subclass(Sub), *args)
    assert len(_validation._VALIDATED) == key_count + 1


# ---- the C common case against the Python checks, on random calls ---------------------------
# _C.functional_add_norm(_) must accept only calls the Python path accepts, with the same
# results; anything else it declines (NotImplemented) or, where the ops themselves refuse
# (a non-contiguous buffer), raises what the Python path raises.

class _Plain(torch.Tensor):
    pass


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _random_tensor(rng, shape, dtype=None, grad=0.0):
    """``grad``: the chance that it requires grad."""
    dtype = dtype or rng.choice(_DTYPES)
    kind = rng.random()
    if kind < 0.04:
        return torch.randint(0, 3, shape)  # an unsupported dtype
    t = torch.randn(shape, dtype=torch.float64).to(dtype)
    if kind < 0.08:
        t = t.as_subclass(_Plain)
    elif kind < 0.12 and t.dim() >= 2 and t.shape[-1] > 1:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)  # not contiguous rows
    if rng.random() < grad:
        t.requires_grad_(True)
    return t


def _either(rng, valid, invalid, p_invalid=0.08):
    """A value from ``valid``, or now and then one that breaks a rule or leaves the C
    common case (``invalid``)."""
    return rng.choice(invalid if rng.random() < p_invalid else valid)


def _random_call(rng, in_place):
    """A functional call's arguments, mostly valid, with one rule broken now and then."""
    hidden = _either(rng, (1, 3, 8, 33, 64), (0,))
    rows = rng.choice(((), (0,), (1,), (3,), (2, 3)))
    shape = (*rows, hidden)
    pick = rng.random
    grad = 0.03 if in_place else 0.3
    x = _random_tensor(rng, shape, grad=grad) if pick() > 0.03 else torch.tensor(1.0)
    residual = None if (pick() < 0.2 and not in_place) else _random_tensor(
        rng, shape if pick() > 0.05 else (*rows, hidden + 1), grad=grad)
    is_rms_norm = pick() < 0.5
    wshape = (hidden,) if pick() > 0.08 else rng.choice(((hidden + 1,), (1, hidden)))
    weight = None if pick() < 0.2 else _random_tensor(rng, wshape, grad=grad)
    if weight is not None and pick() < 0.3:
        weight = torch.nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    bias = None if (is_rms_norm and pick() > 0.05) or pick() < 0.2 else _random_tensor(rng, (hidden,),
                                                                                          grad=grad)
    eps = _either(rng, (None, 1e-5, 1e-6, 0.0, 0, 2), (-1.0, math.nan, math.inf, True, np.float64(1e-5), "1e-5"))
    normalized_shape = _either(rng, (None, None, (hidden,), [hidden], torch.Size([hidden])),
                               (hidden, (hidden + 1,), (True,), (1, hidden), ()))
    weight_offset = _either(rng, (0.0, 0.0, 1.0, 0, 1, -0.5), (math.nan, math.inf, True, np.float32(1.0)))
    common = dict(x=x, residual=residual, weight=weight, bias=bias, eps=eps, is_rms_norm=is_rms_norm,
                  normalized_shape=normalized_shape, weight_offset=weight_offset)
    if in_place:
        return common
    prenorm = pick() < 0.6
    residual_dtype = _either(rng, (None, None, None, *_DTYPES), (torch.int32, "float32"))
    out_dtype = residual_dtype if isinstance(residual_dtype, torch.dtype) else (
        residual.dtype if residual is not None else x.dtype)
    out = residual_out = None
    if pick() < 0.3:
        out = torch.empty(x.shape, dtype=x.dtype if pick() > 0.1 else torch.float64)
        if pick() < 0.1 and x.dim() > 0:
            out = torch.empty((*x.shape[:-1], x.shape[-1] * 2), dtype=x.dtype)[..., ::2]
    if pick() < 0.3:
        residual_out = torch.empty(x.shape, dtype=out_dtype if pick() > 0.1 else torch.float16)
    return dict(common, prenorm=prenorm, residual_dtype=residual_dtype, memory_efficient=pick() < 0.2, out=out,
                residual_out=residual_out)


def _cloned(call):
    return {k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) and
            type(v) is torch.Tensor else v for k, v in call.items()}


def _run(fn):
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 - compared between the paths
        return None, err


def _same(a, b):
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    # bitwise, NaN included (H = 1 with eps = 0 divides by zero on both paths alike)
    return (a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad and
            torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8)))


@needs_c
@pytest.mark.parametrize("in_place", [False, True], ids=["out_of_place", "in_place"])
def test_the_c_common_case_matches_the_python_checks(in_place):
    rng = random.Random(2024 + in_place)
    accepted = declined = 0
    for _ in range(600):
        call = _random_call(rng, in_place)
        fast_args, slow_args = _cloned(call), _cloned(call)
        if in_place:
            fast, fast_err = _run(lambda: ops._c_module.functional_add_norm_(*fast_args.values()))
            slow, slow_err = _run(lambda: functional._add_norm_checked_(*slow_args.values(), "add_rms_norm_", False))
        else:
            a = fast_args
            fast, fast_err = _run(lambda: ops._c_module.functional_add_norm(
                a["x"], a["residual"], a["weight"], a["bias"], a["eps"], a["is_rms_norm"], a["prenorm"],
                a["residual_dtype"], a["memory_efficient"], a["normalized_shape"], a["weight_offset"], a["out"],
                a["residual_out"]))
            b = slow_args
            slow, slow_err = _run(lambda: functional._add_norm_checked(
                b["x"], b["residual"], b["weight"], b["bias"], b["eps"], b["is_rms_norm"], b["prenorm"],
                b["residual_dtype"], b["memory_efficient"], b["normalized_shape"], b["weight_offset"], b["out"],
                b["residual_out"], False))
        if fast is NotImplemented:
            declined += 1
            continue
        if fast_err is not None:  # only the ops' own refusals, word for word
            assert slow_err is not None and type(slow_err) is type(fast_err) and str(slow_err) == str(fast_err), \
                (call, fast_err, slow_err)
            continue
        accepted += 1
        assert slow_err is None, (call, slow_err)
        assert _same(fast, slow), call
        for name in ("x", "residual", "out", "residual_out"):  # what was written, and the buffers returned
            if isinstance(fast_args.get(name), torch.Tensor):
                assert _same(fast_args[name], slow_args[name]), (name, call)
        results = fast if isinstance(fast, tuple) else (fast,)
        for name, k in (("out", 0), ("residual_out", 1), ("x", 0), ("residual", 1)):
            buf = fast_args.get(name)
            if buf is not None and (in_place or name.startswith("out") or name == "residual_out"):
                assert results[k] is buf, (name, call)
    # both outcomes are exercised
    assert accepted > 100 and declined > 100, (accepted, declined)
