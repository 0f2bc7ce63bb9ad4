"""The space of op calls the fuzzer draws from, and the generator that draws them.

Nothing here is a hand-picked grid; every dimension comes from the code it tests:

* **dtype mixes**: every combination of (x, residual, weight, bias, residual_dtype,
  prenorm, memory_efficient) that the functional API's own validation accepts, over
  every floating dtype torch has (:func:`api_mixes`). For each, the op calls the API
  then makes (forward and backward, with the dtypes autograd gives them) are recorded
  by running it once (:func:`op_calls`). A mix the API starts accepting later is drawn
  without any change here; a dtype the emulator cannot pass to the kernels fails.
* **hidden sizes**: log-uniform over 1..262144, plus the boundaries of every shape rule
  of the launch code, found by planning every size on every emulated GPU and keeping
  those where the kernel, block, cluster or occupancy changes
  (``emu_plan_boundaries``), and sizes next to multiples of the vector, slice and
  chunk widths (H % 8, H % (8 * cluster), ...), each +-1 (and +-8).
* **rows**: relative to the plan of that very call: one row, rows around a CTA's row
  groups, around one wave of persistent CTAs or clusters (fewer, equal, one more),
  several waves (loops with several iterations per CTA and per cluster).
* **layouts**: every pointer's address mod 16 (0, 2, 4, 8 bytes, and the rest), for
  every tensor argument including weight, bias, d(residual_out), rstd and the outputs;
  row strides that pad, broadcast (stride 0) or overlap rows.
* **devices**: the H100, A100 and sm_86 profiles, 1..all SMs, thread-block clusters
  allowed or refused; **schedules**: one of the emulator's thread orders, or two whose
  outputs must agree bitwise (half the cases: the emulator's race checks already catch
  a missing barrier whatever the order).

A :class:`Case` is plain data and prints as one line of JSON, which
``tests/fuzz_emulated.py --replay`` runs again.
"""

import dataclasses
import functools
import json
import math
import os
import random
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tools import cuda_emulator

MAX_HIDDEN = 262144
# Elements of one call the fuzzer allows (the emulator runs ~1-2 million a second).
MAX_ELEMENTS = 1 << 20

NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}
DTYPES = {v: k for k, v in NAMES.items()}

# Tensor arguments of the two ops: [rows, H] tensors with a row stride, vectors, outputs.
ROW_INPUTS = ("x", "residual", "dy", "dresidual_out", "saved")
VECTOR_INPUTS = ("weight", "bias", "rstd", "mean")
FWD_OUTPUTS = ("y", "residual_out", "rstd_out", "mean_out")
BWD_OUTPUTS = ("dx", "dresidual", "dweight", "dbias")


def _name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else NAMES[dtype]


# ---- dtype mixes, from the API itself ------------------------------------------------

def candidate_dtypes() -> List[torch.dtype]:
    """Every floating dtype this torch has (fp8 formats included): the universe the
    API's validation picks its accepted dtypes from."""
    seen = []
    for name in dir(torch):
        d = getattr(torch, name)
        if isinstance(d, torch.dtype) and d.is_floating_point and d not in seen:
            seen.append(d)
    return seen


@dataclasses.dataclass(frozen=True)
class ApiMix:
    """One call of add_layer_norm / add_rms_norm, as dtypes and flags (None: absent)."""
    rms: bool
    x: torch.dtype
    residual: Optional[torch.dtype]
    weight: Optional[torch.dtype]
    bias: Optional[torch.dtype]
    residual_dtype: Optional[torch.dtype]
    prenorm: bool
    memory_efficient: bool


@functools.lru_cache(maxsize=None)
def api_mixes() -> Tuple[ApiMix, ...]:
    """Every mix the functional API's validation accepts (checked on meta tensors)."""
    from residual_fused._validation import check_add_norm_args

    options = [None] + candidate_dtypes()
    accepted = []
    meta = lambda d, shape: None if d is None else torch.empty(shape, dtype=d, device="meta")  # noqa: E731
    for rms in (False, True):
        for x in options[1:]:
            for residual in options:
                for weight in options:
                    for bias in (options if not rms else [None]):
                        for residual_dtype in options:
                            try:
                                check_add_norm_args(meta(x, (2, 8)), meta(residual, (2, 8)), meta(weight, (8,)),
                                                    meta(bias, (8,)), 1e-5, None, residual_dtype, rms)
                            except (TypeError, ValueError):
                                continue
                            for prenorm in (False, True):
                                for mem in (False, True):
                                    accepted.append(ApiMix(rms, x, residual, weight, bias, residual_dtype,
                                                           prenorm, mem))
    for mix in accepted:
        for d in (mix.x, mix.residual, mix.weight, mix.bias, mix.residual_dtype):
            if d is not None and d not in cuda_emulator.DTYPE_CODE:
                raise AssertionError(f"the API accepts {d}, which the emulator cannot pass to the kernels: "
                                     f"add it to cuda_emulator.DTYPE_CODE")
    return tuple(accepted)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "residual_fused":
            self.calls.append((func.name().split("::")[-1].split(".")[0], args))
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=None)
def op_calls(mix: ApiMix) -> Tuple[dict, dict]:
    """The forward and backward op calls one training step of ``mix`` makes (every input
    requires grad; in pre-norm both outputs get an upstream gradient): their tensor
    dtypes (None: absent) and flags, as recorded from the API."""
    import residual_fused as rf

    gen = torch.Generator().manual_seed(0)
    t = lambda d, shape: None if d is None else torch.randn(shape, generator=gen).to(d).requires_grad_()  # noqa
    x, residual = t(mix.x, (2, 8)), t(mix.residual, (2, 8))
    weight, bias = t(mix.weight, (8,)), t(mix.bias, (8,))
    kwargs = dict(prenorm=mix.prenorm, residual_dtype=mix.residual_dtype, memory_efficient=mix.memory_efficient)
    rec = _Recorder()
    with rec:
        if mix.rms:
            out = rf.add_rms_norm(x, residual, weight, 1e-5, **kwargs)
        else:
            out = rf.add_layer_norm(x, residual, weight, bias, 1e-5, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    calls = {name: args for name, args in rec.calls}
    dt = lambda v: None if v is None or (isinstance(v, torch.Tensor) and v.numel() == 0) else _name(v.dtype)  # noqa
    fx, fres, fw, fb, _, frms, store, res_out_dtype = calls["add_norm_fwd"][:8]
    store_mean = bool(calls["add_norm_fwd"][9]) if len(calls["add_norm_fwd"]) > 9 else False
    dy, dro, saved, rstd, bw, bb, brms, mem, dres_dtype = calls["add_norm_bwd"][:9]
    mean = calls["add_norm_bwd"][10] if len(calls["add_norm_bwd"]) > 10 else None
    fwd = {"x": dt(fx), "residual": dt(fres), "weight": dt(fw), "bias": dt(fb), "store": bool(store),
           "residual_out": _name(res_out_dtype), "store_mean": store_mean}
    bwd = {"dy": dt(dy), "dresidual_out": dt(dro), "saved": dt(saved), "memory_efficient": bool(mem),
           "dresidual": _name(dres_dtype), "mean": dt(mean)}
    assert frms == brms == mix.rms and dt(rstd) in ("f32", "f64"), calls
    return fwd, bwd


# ---- the case --------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One forward and backward op call on one emulated device (all plain data)."""
    rms: bool
    hidden: int
    rows: int
    eps: float
    fwd: Dict[str, object]      # op_calls' forward: x, residual, weight, bias (dtype names), store, residual_out,
                                # store_mean (absent in older cases)
    bwd: Dict[str, object]      # op_calls' backward: dy, dresidual_out, saved, memory_efficient, dresidual,
                                # mean (the forward's, as autograd passes it; absent in older cases)
    layout: Dict[str, list]     # row input -> [offset bytes, row stride]; vector / output -> [offset bytes]
    device: list                # [profile, SMs (0: all), clusters allowed]
    schedules: list             # one or two of cuda_emulator.SCHEDULES (two: outputs must agree bitwise)
    seed: int                   # the data
    scale: float = 1.0          # magnitude of x and the residual
    threads: Optional[int] = None  # CPU target: torch threads of the calls (None: 1 + seed % 3)
    weight_offset: float = 0.0     # the weight used is weight + weight_offset (needs a weight)
    variant: Optional[list] = None  # [direction, variant]: a tuning override (bench/variants.py) the
                                    # case runs under; a refusal for the shape is accepted

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "Case":
        return Case(**json.loads(text))

    def summary(self) -> str:
        f, b = self.fwd, self.bwd
        parts = ["rms" if self.rms else "ln", f"H={self.hidden}", f"rows={self.rows}", f"x={f['x']}"]
        for k in ("residual", "weight", "bias"):
            parts.append(f"{k[:3]}={f[k] or '-'}")
        parts.append(f"out={f['residual_out'] if f['store'] else '-'}")
        if b["memory_efficient"]:
            parts.append("mem")
        if self.weight_offset:
            parts.append(f"w+{self.weight_offset:g}")
        if self.variant:
            parts.append(f"{self.variant[0]}={self.variant[1]}")
        odd = [f"{k}@{v[0]}" + (f"/s{v[1]}" if len(v) > 1 and v[1] != self.hidden else "")
               for k, v in self.layout.items() if v[0] or (len(v) > 1 and v[1] != self.hidden)]
        if odd:
            parts.append("layout " + ",".join(odd))
        parts.append("{}/{}{}".format(self.device[0], self.device[1] or "all",
                                      "" if self.device[2] else "/no-clusters"))
        return " ".join(parts)


def dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else DTYPES[name]


def tensor_dtypes(case: Case) -> Dict[str, Optional[torch.dtype]]:
    """Every tensor argument of the case's two calls, inputs and outputs, by name."""
    f, b = case.fwd, case.bwd
    stats = torch.float64 if f["x"] == "f64" else torch.float32
    d = {"x": f["x"], "residual": f["residual"], "weight": f["weight"], "bias": f["bias"], "dy": b["dy"],
         "dresidual_out": b["dresidual_out"], "saved": b["saved"], "y": f["x"],
         "residual_out": f["residual_out"] if f["store"] else None, "dx": b["dy"], "dresidual": b["dresidual"],
         "dweight": f["weight"], "dbias": f["bias"]}
    out = {k: dtype_of(v) for k, v in d.items()}
    out["rstd"] = out["rstd_out"] = stats
    out["mean_out"] = stats if f.get("store_mean") else None
    out["mean"] = dtype_of(b.get("mean"))
    return out


# ---- hidden sizes ---------------------------------------------------------------------

def _arithmetic_moduli() -> List[int]:
    """Widths whose multiples are the edges of the kernels' shape rules: vectors and
    row groups (powers of two to a whole CTA), cluster slices (8 x cluster size), and
    a CTA's span at 16 and 32 elements per thread times the cluster size."""
    m = [2 ** k for k in range(3, 15)]
    m += [8 * c for c in range(3, 17)]
    m += [512 * per_thread * c for per_thread in (16, 32) for c in range(1, 17)]
    return sorted(set(x for x in m if x <= MAX_HIDDEN))


@functools.lru_cache(maxsize=None)
def plan_boundaries(lib_path: str) -> Tuple[int, ...]:
    """Hidden sizes where some plan changes, on any profile, either direction, aligned
    (multiples of 8) or not, 16-bit or fp32 tensors; cached beside the library."""
    cache = os.path.join(os.path.dirname(lib_path), "plan-boundaries.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return tuple(json.load(f))
    emu = cuda_emulator.Emulator(lib_path, kernel_build())
    found = set()
    for profile in cuda_emulator.PROFILES:
        for clusters in ((True, False) if profile == "h100" else (True,)):
            emu.configure(profile, 0, clusters)
            for backward in (False, True):
                for dtype in (torch.bfloat16, torch.float32):
                    found.update(emu.plan_boundaries(backward, 1 << 20, 8, MAX_HIDDEN, 8, True, dtype))
                    found.update(emu.plan_boundaries(backward, 1 << 20, 1, 8192, 1, False, dtype))
    emu.configure()
    out = tuple(sorted(found))
    with open(cache + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(cache + ".tmp", cache)
    return out


def kernel_build():
    """nvcc's resource table of the kernels (tools/cubin.py), or None without nvcc."""
    from tools import cubin

    try:
        return cubin.build()
    except FileNotFoundError:
        return None


def draw_hidden(rng: random.Random, boundaries: Tuple[int, ...]) -> int:
    r = rng.random()
    if r < 0.35:
        h = int(math.exp(rng.uniform(0, math.log(MAX_HIDDEN + 1))))
    elif r < 0.7 and boundaries:
        h = rng.choice(boundaries) + rng.choice((-8, -1, 0, 0, 1, 8))
    else:
        m = rng.choice(_arithmetic_moduli())
        h = m * rng.randint(1, MAX_HIDDEN // m) + rng.choice((-1, 0, 0, 1))
    return min(max(h, 1), MAX_HIDDEN)


# ---- devices, layouts, rows ---------------------------------------------------------------

PROFILE_SMS = {"h100": 132, "a100": 108, "sm86": 84}


def draw_device(rng: random.Random, hidden: int) -> list:
    profile = rng.choices(("h100", "a100", "sm86"), (0.55, 0.25, 0.2))[0]
    clusters = profile != "h100" or rng.random() < 0.8
    top = PROFILE_SMS[profile]
    if rng.random() < 0.1:
        sms = 0
    elif profile == "h100" and hidden > 16384 and rng.random() < 0.7:
        sms = rng.randint(16, top)  # a whole GPC: clusters of up to 16 CTAs fit
    else:
        sms = min(top, int(math.exp(rng.uniform(0, math.log(top + 1)))))
    return [profile, max(sms, 0), clusters]


def _offsets(dtype: torch.dtype) -> List[int]:
    size = torch.empty((), dtype=dtype).element_size()
    return [o for o in range(0, 16, size)]


def draw_layout(rng: random.Random, case_dtypes: Dict[str, Optional[torch.dtype]], hidden: int,
                rows: int) -> Dict[str, list]:
    """Half the cases keep every tensor aligned and contiguous (the vectorised paths);
    the rest move one or more tensors off a 16-byte boundary (0, 2, 4, 8 bytes most
    often) or give row inputs padded, broadcast or overlapping rows."""
    present = [k for k, d in case_dtypes.items() if d is not None]
    layout = {}
    odd = set()
    if rng.random() < 0.5:
        k = 1 if rng.random() < 0.6 else rng.randint(2, len(present))
        odd = set(rng.sample(present, min(k, len(present))))
    for name in present:
        offset = 0
        if name in odd and rng.random() < 0.7:
            choices = _offsets(case_dtypes[name])
            preferred = [o for o in choices if o in (2, 4, 8)]
            pool = preferred if preferred and rng.random() < 0.7 else choices[1:] or choices
            offset = rng.choice(pool)
        if name in ROW_INPUTS:
            stride = hidden
            if name in odd and rng.random() < 0.6:
                kind = rng.choice(("pad", "pad", "broadcast", "overlap"))
                if kind == "pad":
                    stride = hidden + rng.randint(1, 16)
                elif kind == "broadcast" and rows > 1:
                    stride = 0
                elif kind == "overlap" and hidden > 1:
                    stride = rng.randint(1, hidden - 1)
            layout[name] = [offset, stride]
        else:
            layout[name] = [offset]
    return layout


def _specs(case: Case, names) -> Dict[str, Optional[cuda_emulator.TensorSpec]]:
    dtypes = tensor_dtypes(case)
    out = {}
    for n in names:
        key = n + "_out" if (n in ("rstd", "mean") and "y" in names) else n
        d = dtypes[key]
        if d is None:
            out[n] = None
            continue
        lay = case.layout.get(key, [0])
        out[n] = cuda_emulator.TensorSpec(d, lay[0], lay[1] if len(lay) > 1 else 0)
    return out


def plans(emu, case: Case, rows: int) -> Tuple[List[dict], List[dict]]:
    """The launches of the case's forward and backward with `rows` rows (not run)."""
    b = case.bwd
    fwd = emu.plan_fwd(rows, case.hidden, _specs(case, ("x", "residual", "weight", "bias", "y", "residual_out",
                                                         "rstd", "mean")), case.rms)
    bwd = emu.plan_bwd(rows, case.hidden, _specs(case, ("dy", "dresidual_out", "saved", "rstd", "weight", "bias",
                                                         "dx", "dresidual", "dweight", "dbias", "mean")),
                       case.rms, b["memory_efficient"])
    return fwd, bwd


def wave_shape(emu, case: Case, backward: bool) -> Tuple[int, int]:
    """(rows one CTA or cluster takes per iteration, rows one full wave takes) of the
    case's main kernel in one direction, from its plans: the work units of a plan are
    grid / cluster, rows per unit the smallest rows count that needs a second unit, less
    one."""
    def units(rows):
        launches = plans(emu, case, rows)[int(backward)]
        return launches[0]["grid"] // launches[0]["cluster"]

    lo, hi = 1, 2
    while units(hi) == 1 and hi < 1 << 20:
        lo, hi = hi, hi * 2
    if units(hi) == 1:
        return 1 << 20, 1 << 20
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if units(mid) == 1 else (lo, mid)
    per_unit = lo
    return per_unit, units(1 << 30) * per_unit


def draw_rows(rng: random.Random, emu, case: Case) -> int:
    """Rows relative to the call's own plan (one direction's, at random), within a
    budget of elements drawn log-uniformly up to MAX_ELEMENTS (most cases small)."""
    per_unit, wave = wave_shape(emu, case, backward=rng.random() < 0.5)
    budget = max(case.hidden, int(math.exp(rng.uniform(math.log(1 << 12), math.log(MAX_ELEMENTS)))))
    kind = rng.choice(("one", "few", "group", "wave", "waves", "waves", "random"))
    if kind == "one":
        rows = 1
    elif kind == "few":
        rows = rng.randint(2, 9)
    elif kind == "group":
        rows = per_unit + rng.choice((-1, 0, 1))
    elif kind == "wave":
        rows = wave + rng.choice((-1, 0, 1))
    elif kind == "waves":
        rows = rng.randint(2, 3) * wave + rng.choice((0, 1, per_unit - 1, rng.randint(0, wave)))
    else:
        rows = int(math.exp(rng.uniform(0, math.log(4097))))
    return max(1, min(rows, budget // case.hidden))


def mix_family(mix: ApiMix) -> str:
    """'uniform': every tensor (and residual_out) in x's dtype; 'stream32': 16-bit x with
    everything else fp32 (mixed-precision training, an fp32 residual stream); else 'other'."""
    others = [d for d in (mix.residual, mix.weight, mix.bias, mix.residual_dtype) if d is not None]
    if all(d == mix.x for d in others):
        return "uniform"
    if mix.x in (torch.float16, torch.bfloat16) and all(d == torch.float32 for d in others):
        return "stream32"
    return "other"


@functools.lru_cache(maxsize=None)
def _mixes_by_family() -> Dict[str, Tuple[ApiMix, ...]]:
    out: Dict[str, list] = {}
    for mix in api_mixes():
        out.setdefault(mix_family(mix), []).append(mix)
    return {k: tuple(v) for k, v in out.items()}


def draw_mix(rng: random.Random) -> ApiMix:
    """Uniform over the accepted mixes would almost never give the common ones (all one
    dtype, or a 16-bit model with an fp32 residual stream), which have their own
    compiled kernels: they get 40% and 20% of the draws."""
    families = _mixes_by_family()
    family = rng.choices(("uniform", "stream32", "other"), (0.4, 0.2, 0.4))[0]
    return rng.choice(families.get(family) or api_mixes())


def make_case(mix: ApiMix, hidden: int, rows: int, device: list, layout: Optional[Dict[str, list]] = None,
              schedules=("warp_greedy", "cta_greedy"), seed: int = 0, eps: float = 1e-5) -> Case:
    """A case written by hand (the regression list): every tensor aligned and contiguous
    unless `layout` says otherwise."""
    fwd, bwd = op_calls(mix)
    case = Case(rms=mix.rms, hidden=hidden, rows=rows, eps=eps, fwd=fwd, bwd=bwd, layout={}, device=list(device),
                schedules=list(schedules), seed=seed)
    for name, d in tensor_dtypes(case).items():
        if d is not None:
            case.layout[name] = [0, hidden] if name in ROW_INPUTS else [0]
    for name, lay in (layout or {}).items():
        assert name in case.layout, f"{name} is not an argument of this case"
        case.layout[name] = list(lay)
    return case


def generate(rng: random.Random, emu, boundaries: Tuple[int, ...]) -> Case:
    """One random case, its rows fitted to the plans of the emulated device it draws."""
    mix = draw_mix(rng)
    fwd, bwd = op_calls(mix)
    hidden = draw_hidden(rng, boundaries)
    device = draw_device(rng, hidden)
    case = Case(rms=mix.rms, hidden=hidden, rows=1, eps=rng.choice((1e-5, 1e-5, 1e-6, 1e-12, 0.1)), fwd=fwd,
                bwd=bwd, layout={}, device=device,
                schedules=rng.sample(list(cuda_emulator.SCHEDULES), 2 if rng.random() < 0.5 else 1),
                seed=rng.randrange(1 << 31), scale=rng.choice((1.0, 1.0, 1.0, 2.0 ** -6, 2.0 ** 6)))
    rows_guess = rng.randint(1, 64)
    case.layout = draw_layout(rng, tensor_dtypes(case), hidden, rows_guess)
    emu.configure(*device)
    try:
        case.rows = draw_rows(rng, emu, case)
    finally:
        emu.configure()
    for name, lay in case.layout.items():  # a broadcast row stride needs rows > 1 to matter; keep it valid
        if len(lay) > 1 and lay[1] == 0 and case.rows == 1:
            lay[1] = hidden
    if fwd["weight"] is not None:
        # From the case's own seed, not `rng`: the cases of a seed stay those drawn before
        # weight_offset existed (the mutant suite's fixed batch among them), a quarter of
        # them now with Gemma's offset of 1 (or another).
        draw = random.Random(case.seed ^ 0x0FF5E7).random()
        case.weight_offset = 1.0 if draw < 0.2 else (-0.5 if draw < 0.25 else 0.0)
    # A quarter of the cases run one direction under a candidate kernel variant (from
    # the seed too, so earlier cases keep their draws).
    draw = random.Random(case.seed ^ 0x7A41A7)
    if draw.random() < 0.25:
        from bench import variants

        direction = draw.choice(("fwd", "bwd"))
        case.variant = [direction, draw.choice(variants.CANDIDATES[direction][1:])]
    return case
