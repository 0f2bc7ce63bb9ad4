"""Benchmark Add & Norm: eager unfused vs torch.compile vs residual_fused.

    python bench/bench_add_norm.py                     # default sweep for the device present
    python bench/bench_add_norm.py --hidden 4096 8192 --modes fwd --norms rms
    python bench/bench_add_norm.py --overhead          # host-side cost per call, tiny tensors

Each row: median time, GB/s of the bytes that variant must move (bench/byte_model.py),
% of the device-to-device copy bandwidth measured in the same run, and speedups
over eager and torch.compile. Every provider's output is checked against the
float64 reference before it is timed. Without a GPU, the sweep is small and times
the PyTorch reference path: CUDA kernel numbers need a GPU.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import residual_fused as rf  # noqa: E402
from byte_model import MODES, Config, eager_bytes, fused_bytes  # noqa: E402
import providers  # noqa: E402
from timing import copy_bandwidth_gbs, host_overhead_us, time_ms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_HIDDEN = {"cuda": [512, 768, 1024, 2048, 4096, 5120, 8192, 12288, 16384, 32768, 65536],
                  "cpu": [1024, 4096]}
DEFAULT_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 18}
TOLERANCE = {torch.bfloat16: 6e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=DTYPES)
    p.add_argument("--residual-fp32", action="store_true",
                   help="bf16/fp16 x with an fp32 residual stream (residual and residual_out)")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (default: per device)")
    p.add_argument("--elements", type=int, help="rows * hidden per config (default: per device)")
    p.add_argument("--norms", nargs="+", default=["layer", "rms"], choices=["layer", "rms"])
    p.add_argument("--forms", nargs="+", default=["post", "pre"], choices=["post", "pre"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--memory-efficient", action="store_true")
    p.add_argument("--providers", nargs="+", default=list(providers.PROVIDERS),
                   choices=list(providers.PROVIDERS))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    p.add_argument("--out", help="write results.csv and env.json into this folder")
    p.add_argument("--overhead", action="store_true", help="measure host overhead per call")
    return p.parse_args(argv)


def environment(device: str) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": device, "cuda_kernels": rf.cuda_kernels_available()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   driver=torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None)
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def make_inputs(cfg: Config, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (cfg.rows, cfg.hidden)

    def randn(*s, dtype, scale=1.0):
        return (torch.randn(*s, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    x = randn(*shape, dtype=cfg.x_dtype).requires_grad_()
    r = randn(*shape, dtype=cfg.residual_dtype).requires_grad_()
    w = (randn(cfg.hidden, dtype=torch.float32).abs() + 0.5).to(cfg.weight_dtype).requires_grad_()
    b = randn(cfg.hidden, dtype=cfg.weight_dtype).requires_grad_()
    dy = randn(*shape, dtype=cfg.x_dtype, scale=1 / 8)
    dres = randn(*shape, dtype=cfg.out_dtype, scale=1 / 8)
    return (x, r, w, b), (dy, dres)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check_output(name, cfg, fn, inputs):
    """Compare the provider's forward with the float64 reference before timing it."""
    x, r, w, b = inputs
    ref_fn = rf.reference.add_rms_norm if cfg.norm == "rms" else rf.reference.add_layer_norm
    args = (x.double(), r.double(), w.double()) + (() if cfg.norm == "rms" else (b.double(),))
    with torch.no_grad():
        expected = _as_tuple(ref_fn(*args, 1e-6 if cfg.norm == "rms" else 1e-5, prenorm=cfg.prenorm))
        got = _as_tuple(fn(x, r, w, b))
    for e, o in zip(expected, got):
        err = (o.double() - e).abs().max().item()
        tol = TOLERANCE[o.dtype] * max(1.0, e.abs().max().item())
        if not err <= tol:
            raise AssertionError(f"{name}: forward differs from the reference by {err:.3g} (> {tol:.3g})")


def step(fn, mode, inputs, grads, prenorm):
    """A zero-argument callable running ``mode`` once."""
    ups = grads if prenorm else grads[:1]
    if mode == "fwd":
        return lambda: fn(*inputs)
    if mode == "bwd":
        outs = _as_tuple(fn(*inputs))
        return lambda: torch.autograd.grad(outs, inputs, ups, retain_graph=True, allow_unused=True)
    return lambda: torch.autograd.grad(_as_tuple(fn(*inputs)), inputs, ups, allow_unused=True)


def configs(args, device):
    elements = args.elements or DEFAULT_ELEMENTS[device.split(":")[0]]
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        res = torch.float32 if args.residual_fp32 else dtype
        for hidden in args.hidden or DEFAULT_HIDDEN[device.split(":")[0]]:
            for norm in args.norms:
                for form in args.forms:
                    yield Config(norm=norm, prenorm=form == "pre", rows=max(1, elements // hidden),
                                 hidden=hidden, x_dtype=dtype, residual_dtype=res, weight_dtype=dtype,
                                 memory_efficient=args.memory_efficient)


def run_sweep(args):
    device = args.device
    on_gpu = device.startswith("cuda")
    repeats = args.repeats or (100 if on_gpu else 20)
    if not on_gpu:
        print("CPU only: timing the PyTorch reference path at small sizes. "
              "CUDA kernel numbers need a GPU.")
    elif not rf.cuda_kernels_available():
        print("warning: the CUDA kernels are not built; residual_fused runs the reference on CUDA.")
    copy_gbs = copy_bandwidth_gbs(device, (1 << 30) if on_gpu else (1 << 26))
    print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s ({device})")
    rows = []
    all_configs = list(configs(args, device))
    total = len(all_configs) * len(args.modes)
    done = 0
    for cfg in all_configs:
        inputs, grads = make_inputs(cfg, device)
        fns = {}
        for name in args.providers:
            try:
                fns[name] = providers.make(name, cfg)
                check_output(name, cfg, fns[name], inputs)
            except providers.Unavailable as why:
                print(f"  skip {name}: {why}")
                fns.pop(name, None)
        for mode in args.modes:
            done += 1
            print(f"\r[{done}/{total}] {cfg.norm} {'pre' if cfg.prenorm else 'post'} "
                  f"H={cfg.hidden} {mode}      ", end="", file=sys.stderr, flush=True)
            times = {}
            for name, fn in fns.items():
                ms = time_ms(step(fn, mode, inputs, grads, cfg.prenorm), device, repeats=repeats)
                nbytes = (fused_bytes if providers.byte_kind(name) == "fused" else eager_bytes)(cfg, mode)
                times[name] = ms
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(norm=cfg.norm, form="pre" if cfg.prenorm else "post", mode=mode,
                                 dtype=str(cfg.x_dtype).replace("torch.", ""),
                                 residual=str(cfg.residual_dtype).replace("torch.", ""),
                                 memory_efficient=cfg.memory_efficient, rows=cfg.rows,
                                 hidden=cfg.hidden, provider=name, ms=ms, bytes=nbytes, gbs=gbs,
                                 pct_copy=100 * gbs / copy_gbs))
            for row in rows[-len(times):]:
                row["vs_eager"] = times["eager"] / row["ms"] if "eager" in times else None
                row["vs_compile"] = times["compile"] / row["ms"] if "compile" in times else None
    print(file=sys.stderr)
    return rows, copy_gbs


def print_table(rows):
    header = (f"{'norm':5} {'form':4} {'mode':7} {'dtype':8} {'rows':>6} {'H':>6} {'provider':15} "
              f"{'time':>10} {'GB/s':>7} {'%copy':>6} {'vs eager':>8} {'vs compile':>10}")
    print(header)
    print("-" * len(header))
    fmt = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in rows:
        print(f"{r['norm']:5} {r['form']:4} {r['mode']:7} {r['dtype']:8} {r['rows']:>6} {r['hidden']:>6} "
              f"{r['provider']:15} {r['ms'] * 1e3:>8.1f}us {r['gbs']:>7.0f} {r['pct_copy']:>5.0f}% "
              f"{fmt(r['vs_eager']):>8} {fmt(r['vs_compile']):>10}")


def run_overhead(device):
    """Host microseconds per forward on a tiny tensor: fused vs the eager pair."""
    x = torch.randn(1, 64, device=device)
    r, w, b = torch.randn(1, 64, device=device), torch.ones(64, device=device), torch.zeros(64, device=device)
    results = {}
    with torch.no_grad():
        results["eager x + r; F.layer_norm (no grad)"] = host_overhead_us(
            lambda: torch.nn.functional.layer_norm(x + r, (64,), w, b))
        results["rf.add_layer_norm (no grad)"] = host_overhead_us(lambda: rf.add_layer_norm(x, r, w, b))
        # The op alone: the difference to the line above is the Python call path
        # (argument checks + dispatch); the op itself is the kernel, or on CPU the
        # pure-PyTorch reference math.
        results["  of which the forward op alone"] = host_overhead_us(
            lambda: torch.ops.residual_fused.add_norm_fwd(x, r, w, b, 1e-5, False, False, x.dtype))
        results["rf.add_layer_norm prenorm (no grad)"] = host_overhead_us(
            lambda: rf.add_layer_norm(x, r, w, b, prenorm=True))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    results["eager x + r; F.layer_norm (grad)"] = host_overhead_us(
        lambda: torch.nn.functional.layer_norm(xg + r, (64,), wg, b))
    results["rf.add_layer_norm (grad)"] = host_overhead_us(lambda: rf.add_layer_norm(xg, r, wg, b))
    print(f"host time per forward call, 1x64 fp32 on {device} (median):")
    for name, us in results.items():
        print(f"  {name:40} {us:6.1f} us")
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.overhead:
        run_overhead(args.device)
        return
    rows, copy_gbs = run_sweep(args)
    print_table(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(args.out, "env.json"), "w") as f:
            json.dump({**environment(args.device), "copy_gbs": copy_gbs}, f, indent=2)
        print(f"wrote {args.out}/results.csv and env.json")


if __name__ == "__main__":
    main()
