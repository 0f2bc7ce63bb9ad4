"""Host time per call at small sizes, where a fused op's cost is its call path.

    python bench/bench_add_norm.py --overhead [--device cuda] [--threads 2]

Pre-norm Add & Norm (``h = x + r; y = norm(h)``, both returned) at 1 x 64, 1 x 4096,
8 x 4096 and 64 x 4096, LayerNorm and RMSNorm, forward only: the eager pair, a bare
``torch.add`` (the floor any op call pays), torch.compile of the eager pair, the add
and ``nn.LayerNorm`` / ``nn.RMSNorm`` as modules, and this library's functional form,
module, ``out=`` buffers and in-place form, each with and
without grad where it applies. Calls of one table take turns batch by batch, so a
shared machine's slow moments fall on all of them alike; the ratio to the eager pair
is computed within the run.

On CPU the host time is the call's time (the kernel runs on the calling thread). On
CUDA the GPU queue is kept busy while the host is timed (a sleep kernel ahead of each
batch), so a launch never waits for the device and the time is the host's alone;
the device time is then timed separately with CUDA events.
"""

import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import residual_fused as rf

SIZES = ((1, 64), (1, 4096), (8, 4096), (64, 4096))
BATCHES = 30  # timed batches per call (the median and spread are over them)


def _batch_us(fn: Callable[[], object], calls: int, cuda: bool) -> float:
    if cuda:
        torch.cuda._sleep(2_000_000)  # a few ms of device work ahead of the batch
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) / calls * 1e6
    if cuda:
        torch.cuda.synchronize()
    return us


def host_times(fns: Dict[str, Callable[[], object]], cuda: bool, calls: int = 50,
               batches: int = BATCHES) -> Dict[str, Tuple[float, float]]:
    """{name: (median host microseconds per call, spread %: interquartile range / median)}."""
    for fn in fns.values():  # warm up (compiles, caches, allocator pools)
        for _ in range(5):
            fn()
    if cuda:
        torch.cuda.synchronize()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(batches):
        for name, fn in fns.items():
            samples[name].append(_batch_us(fn, calls, cuda))
    out = {}
    for name, s in samples.items():
        median = statistics.median(s)
        q1, _, q3 = statistics.quantiles(s, n=4)
        out[name] = (median, 100.0 * (q3 - q1) / median)
    return out


def device_us(fn: Callable[[], object], calls: int = 200) -> float:
    """CUDA: device microseconds per call, back to back (CUDA events around a batch)."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def calls_for(norm: str, rows: int, hidden: int, device: str, dtype, with_compile: bool):
    """{name: (call without grad or None, call with grad or None)}."""
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    r = torch.randn(rows, hidden, device=device, dtype=dtype)
    w = torch.randn(hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, device=device, dtype=dtype)
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    rms = norm == "rms"

    def eager(x, r, w, b):
        h = x + r
        return (F.rms_norm(h, (hidden,), w, 1e-6) if rms else F.layer_norm(h, (hidden,), w, b)), h

    def fused(x, r, w, b):
        if rms:
            return rf.add_rms_norm(x, r, w, 1e-6, prenorm=True)
        return rf.add_layer_norm(x, r, w, b, prenorm=True)

    module = (rf.FusedAddRMSNorm(hidden, eps=1e-6, prenorm=True) if rms
              else rf.FusedAddNorm(hidden, prenorm=True)).to(device=device, dtype=dtype)
    torch_module = (torch.nn.RMSNorm(hidden, eps=1e-6) if rms
                    else torch.nn.LayerNorm(hidden)).to(device=device, dtype=dtype)

    def eager_module(x, r):  # what FusedAddNorm replaces in a model
        h = x + r
        return torch_module(h), h
    out, res_out = torch.empty_like(x), torch.empty_like(r)
    # in place over a copy: the values stay finite call after call (y is normalized)
    xi, ri = x.clone(), r.clone()

    def inplace():
        if rms:
            return rf.add_rms_norm_(xi, ri, w, 1e-6)
        return rf.add_layer_norm_(xi, ri, w, b)

    table = {
        "bare torch.add": (lambda: torch.add(x, r), lambda: torch.add(xg, rg)),
        "eager pair": (lambda: eager(x, r, w, b), lambda: eager(xg, rg, wg, bg)),
        "rf functional": (lambda: fused(x, r, w, b), lambda: fused(xg, rg, wg, bg)),
        "eager module pair": (lambda: eager_module(x, r), None),
        "rf module": (lambda: module(x, r), None),
        "rf out=": (lambda: (rf.add_rms_norm(x, r, w, 1e-6, prenorm=True, out=out, residual_out=res_out) if rms
                              else rf.add_layer_norm(x, r, w, b, prenorm=True, out=out, residual_out=res_out)),
                    None),
        "rf in place": (inplace, None),
    }
    if with_compile:
        # A fresh cache per table: every table's closure is the same code object, and
        # after dynamo's recompile limit a compiled call silently runs eager.
        torch._dynamo.reset()
        compiled = torch.compile(eager, dynamic=False)
        table["torch.compile pair"] = (lambda: compiled(x, r, w, b), lambda: compiled(xg, rg, wg, bg))
    return table


def run(device: str, with_compile: bool = True, sizes=SIZES, batches: int = BATCHES) -> List[dict]:
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows_out = []
    for norm in ("layer", "rms"):
        for rows, hidden in sizes:
            table = calls_for(norm, rows, hidden, device, dtype, with_compile)
            for grad in (False, True):
                fns = {name: pair[grad] for name, pair in table.items() if pair[grad] is not None}
                if grad:
                    got = host_times(fns, cuda, batches=batches)
                else:
                    with torch.no_grad():
                        got = host_times(fns, cuda, batches=batches)
                eager_us = got["eager pair"][0]
                for name, (us, spread) in got.items():
                    row = dict(norm=norm, rows=rows, hidden=hidden, grad=grad, call=name, host_us=us,
                               spread=spread, vs_eager=us / eager_us)
                    if cuda:
                        with torch.set_grad_enabled(grad):
                            row["device_us"] = device_us(fns[name])
                    rows_out.append(row)
    return rows_out


def format_rows(rows: List[dict], device: str) -> str:
    cuda = any("device_us" in r for r in rows)
    head = "| norm | rows x H | grad | call | host us (median) | spread | vs eager pair |"
    head += " device us |" if cuda else ""
    lines = [f"host time per pre-norm forward call on {device} (median of {BATCHES} batches; spread: "
             f"interquartile range / median)", "", head,
             "|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in rows:
        line = (f"| {r['norm']} | {r['rows']} x {r['hidden']} | {'yes' if r['grad'] else 'no'} | {r['call']} | "
                f"{r['host_us']:.1f} | {r['spread']:.0f}% | {r['vs_eager']:.2f}x |")
        if cuda:
            line += f" {r['device_us']:.1f} |"
        lines.append(line)
    return "\n".join(lines)
