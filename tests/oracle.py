"""The correctness rule shared by every test of an Add & Norm path.

For every output and gradient ``t`` (y, residual_out, dx, dresidual, dweight, dbias):

    max|t_ours - t_ref| <= 2 * max|t_eager - t_ref| + atol(t.dtype)

where ``t_ref`` is ``residual_fused.reference`` in float64 on upcast inputs and
``t_eager`` is plain unfused PyTorch in the inputs' own dtypes. A NaN where the
reference has none always fails. Inputs are random (weights too) and upstream
gradients are ``randn / 8``, with residual_out given its own.
"""

import contextlib
import dataclasses
import itertools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

import residual_fused as rf

ATOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    """One Add & Norm call. ``None`` dtypes mean the tensor is absent."""

    rms: bool = False
    shape: Tuple[int, ...] = (7, 123)  # rows dims + normalized dims
    normalized_ndim: int = 1
    x: torch.dtype = torch.bfloat16
    residual: Optional[torch.dtype] = torch.bfloat16
    weight: Optional[torch.dtype] = torch.bfloat16
    bias: Optional[torch.dtype] = torch.bfloat16
    prenorm: bool = False
    residual_dtype: Optional[torch.dtype] = None
    memory_efficient: bool = False
    row_strided: bool = False  # x, residual and dy are slices of wider tensors
    eps: float = 1e-5

    @property
    def normalized_shape(self):
        return self.shape[len(self.shape) - self.normalized_ndim:]

    def __str__(self):  # readable pytest ids
        parts = ["rms" if self.rms else "ln", "x".join(map(str, self.shape))]
        for name in ("x", "residual", "weight", "bias", "residual_dtype"):
            dtype = getattr(self, name)
            parts.append(f"{name[:3]}={str(dtype).replace('torch.', '') if dtype else '-'}")
        for flag in ("prenorm", "memory_efficient", "row_strided"):
            if getattr(self, flag):
                parts.append(flag)
        return ",".join(parts)


def flag_cases(**base):
    """Every combination of the boolean flags (and optional tensors) for both norms."""
    for rms, prenorm, has_res, has_w, has_b, mem, strided in itertools.product(
            (False, True), repeat=7):
        if rms and has_b:
            continue
        dtype = base.get("x", torch.bfloat16)
        yield Case(**{**base, "rms": rms, "prenorm": prenorm,
                      "residual": dtype if has_res else None,
                      "weight": dtype if has_w else None,
                      "bias": dtype if has_b else None,
                      "memory_efficient": mem, "row_strided": strided})


def _randn(shape, dtype, device, strided, gen):
    if strided:  # a slice t[..., :H] of a wider tensor: rows not contiguous with each other
        wide = torch.randn(*shape[:-1], shape[-1] + 5, generator=gen, dtype=torch.float64)
        return wide.to(device=device, dtype=dtype)[..., : shape[-1]]
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def make_inputs(case: Case, device, seed=0):
    """Random inputs for ``case``: a dict of leaf tensors (no grad yet) and upstream grads."""
    gen = torch.Generator().manual_seed(seed)
    ns = case.normalized_shape
    t = {"x": _randn(case.shape, case.x, device, case.row_strided, gen)}
    t["residual"] = (_randn(case.shape, case.residual, device, case.row_strided, gen)
                     if case.residual else None)
    if case.weight:
        w = torch.randn(ns, generator=gen, dtype=torch.float64)
        if case.memory_efficient:
            # xhat = (y - b) / w: the recovered xhat's error scales as 1/|w|, so the
            # memory-efficient mode is tested with weights away from zero.
            w = torch.sign(w) * (0.5 + w.abs().clamp(max=1.0))
        t["weight"] = w.to(device=device, dtype=case.weight)
    else:
        t["weight"] = None
    t["bias"] = (torch.randn(ns, generator=gen, dtype=torch.float64).to(device, case.bias)
                 if case.bias else None)
    out_dtype = case.residual_dtype or case.residual or case.x
    grads = {"y": _randn(case.shape, case.x, device, case.row_strided, gen) / 8}
    if case.prenorm:
        grads["residual_out"] = _randn(case.shape, out_dtype, device, False, gen) / 8
    return t, grads


def _leaves(inputs, dtype=None):
    out = {}
    for name, v in inputs.items():
        if v is None:
            out[name] = None
            continue
        v = v.detach().to(dtype) if dtype else v.detach().clone()
        out[name] = v.requires_grad_()
    return out


def _call(fn, case, t):
    kwargs = dict(prenorm=case.prenorm, residual_dtype=case.residual_dtype,
                  memory_efficient=case.memory_efficient,
                  normalized_shape=case.normalized_shape)
    if case.rms:
        return fn(t["x"], t["residual"], t["weight"], case.eps, **kwargs)
    return fn(t["x"], t["residual"], t["weight"], t["bias"], case.eps, **kwargs)


def eager(x, residual, weight, bias=None, eps=None, *, rms, prenorm, residual_dtype,
          normalized_shape, **_):
    """Plain unfused PyTorch in the inputs' dtypes, as a user would write it."""
    s = x if residual is None else x + residual
    out_dtype = residual_dtype or (residual.dtype if residual is not None else x.dtype)
    residual_out = s.to(out_dtype)
    dtypes = [t.dtype for t in (residual_out, weight, bias) if t is not None]
    common = dtypes[0]
    for d in dtypes[1:]:
        common = torch.promote_types(common, d)
    cast = lambda t: None if t is None else t.to(common)  # noqa: E731
    if rms:
        y = F.rms_norm(cast(residual_out), normalized_shape, cast(weight), eps)
    else:
        y = F.layer_norm(cast(residual_out), normalized_shape, cast(weight), cast(bias), eps)
    y = y.to(x.dtype)
    return (y, residual_out) if prenorm else y


def run(path: str, case: Case, inputs, grads):
    """Forward + backward through ``path``, one of:

    * ``ours``: the library (its ops: the compiled CPU/CUDA kernels where built, else
      the reference registered as the ops' kernel);
    * ``reference``: ``residual_fused.reference`` in float64 on upcast inputs;
    * ``reference_native``: ``residual_fused.reference`` in the inputs' dtypes;
    * ``eager``: unfused PyTorch in the inputs' dtypes;
    * ``independent``: unfused PyTorch (``F.layer_norm``/``F.rms_norm``) in float64.

    Returns a dict of the named outputs and gradients (absent ones are omitted).
    """
    fp64 = path in ("reference", "independent")
    t = _leaves(inputs, torch.float64 if fp64 else None)
    up = {k: v.to(torch.float64) for k, v in grads.items()} if fp64 else grads
    if path in ("reference", "reference_native"):
        out = _call(rf.reference.add_rms_norm if case.rms else rf.reference.add_layer_norm, case, t)
    elif path == "ours":
        out = _call(rf.add_rms_norm if case.rms else rf.add_layer_norm, case, t)
    else:
        out = eager(t["x"], t["residual"], t["weight"], t["bias"], case.eps, rms=case.rms,
                    prenorm=case.prenorm,
                    residual_dtype=None if fp64 else case.residual_dtype,
                    normalized_shape=case.normalized_shape)
    result = {"y": out[0] if case.prenorm else out}
    if case.prenorm:
        result["residual_out"] = out[1]
    outs = [result[k] for k in up]
    torch.autograd.backward(outs, [up[k] for k in up])
    for name, key in (("dx", "x"), ("dresidual", "residual"), ("dweight", "weight"),
                      ("dbias", "bias")):
        if t[key] is not None:
            result[name] = t[key].grad
    return {k: v.detach() for k, v in result.items()}


@contextlib.contextmanager
def poisoned_outputs(device):
    """Make every output a kernel fails to write show up as NaN, not a stale value.

    CUDA: blocks the caching allocator hands out next are filled with NaN. CPU: torch's
    deterministic mode fills each new tensor with NaN when it is allocated (the CPU
    kernels allocate their outputs with at::empty)."""
    if torch.device(device).type == "cuda":
        poison_cuda_allocator(device)
        yield
        return
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def poison_cuda_allocator(device) -> None:
    """Fill blocks the CUDA caching allocator will hand out next with NaN, so that an
    output element a kernel fails to write shows up as NaN instead of a stale value."""
    if torch.device(device).type != "cuda":
        return
    nan = float("nan")
    small = [torch.full((1 << 17,), nan, device=device) for _ in range(32)]  # small pool
    large = torch.full((1 << 26,), nan, device=device)  # large pool, 256 MB
    del small, large


def _max_err(a, ref):
    if a.numel() == 0:
        return 0.0
    return (a.to(torch.float64) - ref).abs().max().item()


def check_against_reference(case: Case, device, seed=0, ours="ours", oracle="reference"):
    """Apply the rule to every output and gradient of path ``ours``, with path
    ``oracle`` as the float64 truth; return the errors."""
    inputs, grads = make_inputs(case, device, seed)
    snapshot = {k: v.clone() for k, v in inputs.items() if v is not None}
    ref = run(oracle, case, inputs, grads)
    eag = run("eager", case, inputs, grads)
    with poisoned_outputs(device):
        got = run(ours, case, inputs, grads)
    for k, v in snapshot.items():
        assert torch.equal(v, inputs[k]), f"{case}: input {k} was modified"

    expected_dtypes = {"y": case.x, "residual_out": case.residual_dtype or case.residual or case.x,
                       "dx": case.x, "dresidual": case.residual, "dweight": case.weight,
                       "dbias": case.bias}
    assert set(got) == set(ref), f"{case}: outputs {sorted(got)} != {sorted(ref)}"
    errors = {}
    for name in ref:
        t, r, e = got[name], ref[name], eag[name]
        assert t.dtype == expected_dtypes[name], f"{case}: {name} dtype {t.dtype}"
        assert t.shape == r.shape, f"{case}: {name} shape {tuple(t.shape)} != {tuple(r.shape)}"
        ok = ~torch.isnan(r)
        assert not torch.isnan(t[ok]).any(), f"{case}: NaN in {name} where the reference has none"
        err, err_eager = _max_err(t[ok], r[ok]), _max_err(e[ok], r[ok])
        bound = 2 * err_eager + ATOL[t.dtype]
        assert err <= bound, (f"{case}: {name} max error {err:.3g} > bound {bound:.3g} "
                              f"(eager error {err_eager:.3g})")
        errors[name] = (err, err_eager)
    return errors
