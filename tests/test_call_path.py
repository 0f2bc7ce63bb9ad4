"""The functional API's call path: the compiled library's plain-function entries where
nothing else would intercept the call, torch.ops where something would, and argument
checks cached per call signature. Results and errors are the same either way."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import residual_fused as rf
from residual_fused import _validation, ops

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
    assert counting.calls == ["add_norm", "add_norm_fwd_out", "add_norm_fwd_inplace"]
    assert w.grad is not None


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
    assert counting.calls == []
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
    _validation._VALIDATED.clear()
    x, w = torch.randn(4, 8), torch.randn(8)
    rf.add_layer_norm(x, weight=w)
    rf.add_layer_norm(x, weight=w)
    assert len(_validation._VALIDATED) == 1
    with pytest.raises(ValueError, match=r"weight: shape \(7,\) must equal normalized_shape"):
        rf.add_layer_norm(x, weight=torch.randn(7), normalized_shape=8)
    with pytest.raises(ValueError, match=r"eps must be a finite non-negative number"):
        rf.add_layer_norm(x, weight=w, eps=-1.0)
    with pytest.raises(ValueError, match=r"residual is on|residual: shape"):
        rf.add_layer_norm(x, torch.randn(4, 9), w)
    assert len(_validation._VALIDATED) == 1  # failures are never cached
    # a list normalized_shape is unhashable: checked in full each time, still right
    assert torch.equal(rf.add_layer_norm(x, weight=w, normalized_shape=[8]), rf.add_layer_norm(x, weight=w))
    # the cache is bounded
    for k in range(_validation._VALIDATED_MAX + 5):
        rf.add_rms_norm(torch.randn(1, 8), eps=1e-6 + k * 1e-9)
    assert len(_validation._VALIDATED) <= _validation._VALIDATED_MAX


def test_cached_signature_keeps_the_subclass_apart():
    """A tensor subclass with the same shape, dtype and device is a different signature."""
    class Sub(torch.Tensor):
        pass

    x = torch.randn(2, 8)
    rf.add_layer_norm(x)
    sub = x.as_subclass(Sub)
    key_count = len(_validation._VALIDATED)
    rf.add_layer_norm(sub)
    assert len(_validation._VALIDATED) == key_count + 1
