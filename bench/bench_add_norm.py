"""Benchmark Add & Norm: eager unfused, torch.compile, residual_fused and peers.

    python bench/bench_add_norm.py                      # default sweep + decode table
    python bench/bench_add_norm.py --full               # every dtype, memory-efficient too
    python bench/bench_add_norm.py --hidden 4096 8192 --modes fwd --norms rms
    python bench/bench_add_norm.py --out bench/out      # + results.csv, env.json, PNG plots
    python bench/bench_add_norm.py --results            # bench/results/<gpu>.md + plots
    python bench/bench_add_norm.py --overhead           # host time per call, tiny tensors

Each row reports:

- the median time and its spread (interquartile range / median), with the L2 cache
  flushed before every repeat on CUDA;
- GB/s of the bytes that variant must move (bench/byte_model.py);
- the % of the copy bandwidth measured in the same run: on CUDA a 1 GiB
  device-to-device clone; on CPU a clone of the row's own tensor size and dtype
  with the same threads, timed in turn with the providers' calls, so both sides of
  the ratio see the same cache level and the same moment;
- the speedups over eager and over torch.compile.

Every provider's forward is checked against the float64 reference before it is
timed. Peers (flash-attn, Liger, Apex, QuACK, TransformerEngine) run when they
import and are skipped with a reason otherwise.

On CPU, torch's thread count is fixed (``--threads``) and printed, and glibc is
told to keep freed memory (``--malloc reuse``, the default): otherwise every
tensor above 32 MiB is a fresh mapping whose page faults cost more than the
kernel, for every provider and for the copy alike.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys

import torch

if __name__ == "__main__":  # run as a script: bench and tools are packages of the repository root
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import residual_fused as rf  # noqa: E402
from bench import providers, report  # noqa: E402
from bench.byte_model import MODES, Config, eager_bytes, fused_bytes  # noqa: E402
from bench.timing import copy_bandwidth_gbs, host_overhead_us, time_interleaved, time_stats  # noqa: E402

DTYPES = {"bf16": (torch.bfloat16, torch.bfloat16), "fp16": (torch.float16, torch.float16),
          "fp32": (torch.float32, torch.float32),
          "bf16-fp32res": (torch.bfloat16, torch.float32)}  # x dtype, residual dtype
SWEEP_HIDDEN = {"cuda": [512, 768, 1024, 2048, 4096, 5120, 8192, 12288, 16384, 32768, 65536],
                "cpu": [1024, 4096]}
SWEEP_ELEMENTS = {"cuda": [1 << 26], "cpu": [1 << 22, 1 << 24]}  # rows * hidden
SWEEP_DTYPES = {"cuda": ["bf16"], "cpu": ["bf16", "fp32"]}
SPREAD_WARNING = 25.0  # % (interquartile range / median) above which a row is flagged
COPY = "(copy)"  # the clone timed beside the providers on CPU
DECODE_ROWS = (1, 8, 32, 128)
DECODE_HIDDEN = {"cuda": (4096, 8192), "cpu": (4096,)}
TOLERANCE = {torch.bfloat16: 6e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true",
                   help="all dtypes (bf16, fp16, fp32, bf16 x with fp32 residual) and "
                        "memory-efficient rows too")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES,
                   help="default: bf16 on CUDA, bf16 and fp32 on CPU (--full: all)")
    p.add_argument("--memory-efficient", choices=["off", "on", "both"],
                   help="default: off (--full: both)")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (default: per device)")
    p.add_argument("--elements", type=int, nargs="+",
                   help="rows * hidden per config (default: 2^26 on CUDA, 2^22 and 2^24 on CPU)")
    p.add_argument("--threads", type=int,
                   help="CPU: torch threads (default: torch's default, the physical cores)")
    p.add_argument("--malloc", choices=["reuse", "system"], default="reuse",
                   help="CPU: reuse keeps freed memory in the process (glibc mallopt) so "
                        "large tensors do not page-fault on every call; system leaves "
                        "glibc's defaults")
    p.add_argument("--norms", nargs="+", default=["layer", "rms"], choices=["layer", "rms"])
    p.add_argument("--forms", nargs="+", default=["post", "pre"], choices=["post", "pre"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--providers", nargs="+", default=list(providers.PROVIDERS),
                   choices=list(providers.PROVIDERS))
    p.add_argument("--no-decode", action="store_true", help="skip the small-batch table")
    p.add_argument("--decode-only", action="store_true", help="only the small-batch table")
    p.add_argument("--repeats", type=int, help="timed repeats per row (median)")
    p.add_argument("--out", help="write results.csv, env.json and PNG plots into this folder")
    p.add_argument("--results", action="store_true",
                   help="write bench/results/<device>.md and its plots (the committed results)")
    p.add_argument("--overhead", action="store_true", help="only measure host time per call")
    p.add_argument("--page-from", metavar="DIR",
                   help="no timing: write bench/results/<device>.md from a folder that --out "
                        "wrote (results.csv, env.json), e.g. one copied back from a GPU machine")
    p.add_argument("--command", help="with --page-from: the command that recorded the folder")
    p.add_argument("--results-dir", help="with --page-from: write the page here instead of "
                                         "bench/results (e.g. beside the logs of a GPU run)")
    return p.parse_args(argv)


def environment(device: str) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "device": device,
           "cuda_kernels": rf.cuda_kernels_available()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["sm_count"] = props.multi_processor_count
        try:
            import subprocess
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:
            env["driver"] = None
    else:
        env["cpu"] = cpu_name()
        env["threads"] = torch.get_num_threads()
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["cpu_kernels"] = rf.cpu_kernels_available()
    return env


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def keep_freed_memory() -> str:
    """Tell glibc to keep freed memory for reuse (what jemalloc and tcmalloc do by
    default). Returns what was done, for the log."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "not glibc: allocator left as it is"
    m_trim_threshold, m_mmap_threshold = -1, -3
    one_gib = ctypes.c_int(1 << 30)
    if libc.mallopt(m_mmap_threshold, one_gib) != 1 or libc.mallopt(m_trim_threshold, one_gib) != 1:
        return "glibc refused mallopt: allocator left as it is"
    return "glibc keeps freed memory (mmap and trim thresholds 1 GiB)"


def make_inputs(cfg: Config, device: str, seed: int = 0):
    """Random inputs (never zeros) with gradients enabled, and upstream gradients."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (cfg.rows, cfg.hidden)

    def randn(*s, dtype, scale=1.0):
        return (torch.randn(*s, generator=g, device=device) * scale).to(dtype)

    x = randn(*shape, dtype=cfg.x_dtype).requires_grad_()
    r = randn(*shape, dtype=cfg.residual_dtype).requires_grad_()
    # Away from zero: the memory-efficient backward divides by the weight.
    w = (randn(cfg.hidden, dtype=torch.float32).abs() + 0.5).to(cfg.weight_dtype).requires_grad_()
    b = randn(cfg.hidden, dtype=cfg.weight_dtype).requires_grad_()
    dy = randn(*shape, dtype=cfg.x_dtype, scale=1 / 8)
    dres = randn(*shape, dtype=cfg.out_dtype, scale=1 / 8)
    return (x, r, w, b), (dy, dres)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check_output(name: str, cfg: Config, fn, inputs) -> None:
    """Raise if the provider's forward differs from the float64 reference."""
    x, r, w, b = inputs
    ref = rf.reference.add_rms_norm if cfg.norm == "rms" else rf.reference.add_layer_norm
    args = (x.double(), r.double(), w.double()) + (() if cfg.norm == "rms" else (b.double(),))
    with torch.no_grad():
        expected = _as_tuple(ref(*args, providers.EPS[cfg.norm], prenorm=cfg.prenorm))
        got = _as_tuple(fn(x, r, w, b))
    if len(got) != len(expected):
        raise providers.Unavailable(f"returned {len(got)} outputs, expected {len(expected)}")
    for e, o in zip(expected, got):
        err = (o.double() - e).abs().max().item()
        tol = TOLERANCE.get(o.dtype, 1e-4) * max(1.0, e.abs().max().item())
        if not err <= tol:
            raise providers.Unavailable(f"output differs from the reference by {err:.3g}")


def step(fn, mode: str, inputs, grads, prenorm: bool):
    """A zero-argument callable that runs `mode` once."""
    ups = grads if prenorm else grads[:1]
    if mode == "fwd":
        return lambda: fn(*inputs)
    if mode == "bwd":
        outs = _as_tuple(fn(*inputs))
        return lambda: torch.autograd.grad(outs, inputs, ups, retain_graph=True, allow_unused=True)
    return lambda: torch.autograd.grad(_as_tuple(fn(*inputs)), inputs, ups, allow_unused=True)


def mix_config(mix: str, **fields) -> Config:
    """A Config in the dtype mix ``mix`` (a DTYPES key): the weight is fp32 with an
    fp32 residual stream, else in x's dtype."""
    x_dtype, res_dtype = DTYPES[mix]
    return Config(x_dtype=x_dtype, residual_dtype=res_dtype,
                  weight_dtype=torch.float32 if res_dtype == torch.float32 else x_dtype, **fields)


def sweep_configs(args, kind: str):
    full = args.full
    dtypes = args.dtypes or (list(DTYPES) if full else SWEEP_DTYPES[kind])
    mem = args.memory_efficient or ("both" if full else "off")
    mems = {"off": [False], "on": [True], "both": [False, True]}[mem]
    for elements in args.elements or SWEEP_ELEMENTS[kind]:
        for name in dtypes:
            for hidden in args.hidden or SWEEP_HIDDEN[kind]:
                for norm in args.norms:
                    for form in args.forms:
                        for me in mems:
                            yield mix_config(name, norm=norm, prenorm=form == "pre",
                                             rows=max(1, elements // hidden), hidden=hidden,
                                             memory_efficient=me)


def decode_configs(kind: str):
    for hidden in DECODE_HIDDEN[kind]:
        for rows in DECODE_ROWS:
            yield Config(norm="rms", prenorm=True, rows=rows, hidden=hidden)
            yield Config(norm="layer", prenorm=False, rows=rows, hidden=hidden)


def _row(table, cfg, mode, provider, **extra):
    dtype = str(cfg.x_dtype).replace("torch.", "")
    row = dict(table=table, norm=cfg.norm, form="pre" if cfg.prenorm else "post", mode=mode,
               dtype=dtype if cfg.residual_dtype == cfg.x_dtype else f"{dtype}+fp32res",
               residual=str(cfg.residual_dtype).replace("torch.", ""),
               memory_efficient=cfg.memory_efficient, rows=cfg.rows, hidden=cfg.hidden,
               provider=provider, fused_add=None, ms=None, spread=None, host_us=None, bytes=None,
               gbs=None, copy_gbs=None, pct_copy=None, vs_eager=None, vs_compile=None, note="")
    row.update(extra)
    return row


def timed(calls, device, repeats, cfg, x, copy_gbs, mode="fwd"):
    """({provider: Timing}, copy GB/s for these rows).

    CUDA: each provider timed on its own, the L2 flushed before every call, against
    the one 1 GiB copy. CPU: the providers and a clone of x (the row's own size and
    dtype, so both sides of the % see the same cache level) take turns call by call,
    so a shared machine's slow moments hit all of them alike."""
    if device.startswith("cuda"):
        return ({name: time_stats(call, device, repeats=repeats) for name, call in calls.items()},
                copy_gbs(cfg, mode))
    source = x.detach()
    timings = time_interleaved({**calls, COPY: source.clone}, repeats=repeats)
    copy = copy_gbs.record(2 * source.numel() * source.element_size(), timings.pop(COPY).ms)
    return timings, copy


def run_table(table, configs, modes, args, copy_gbs, progress):
    """``copy_gbs(cfg, mode)``: the copy bandwidth a config's rows are compared with."""
    device = args.device
    repeats = args.repeats or (100 if device.startswith("cuda") else 20)
    rows = []
    for cfg in configs:
        inputs, grads = make_inputs(cfg, device)
        fns = {}
        for name in args.providers:
            try:
                fn = providers.make(name, cfg, device)
                check_output(name, cfg, fn, inputs)
                fns[name] = fn
            except providers.Unavailable as why:
                rows += [_row(table, cfg, m, name, note=str(why)) for m in modes]
            except Exception as err:  # a peer that breaks on this config: say so, go on
                rows += [_row(table, cfg, m, name, note=f"failed: {type(err).__name__}: {err}"[:160])
                         for m in modes]
        for mode in modes:
            progress.step(f"{table} {cfg.norm} {'pre' if cfg.prenorm else 'post'} "
                          f"{cfg.rows}x{cfg.hidden} {mode}")
            if table == "decode":
                with torch.no_grad():  # serving: no autograd
                    calls = {name: (lambda fn=fn: fn(*inputs)) for name, fn in fns.items()}
                    timings, copy = timed(calls, device, repeats, cfg, inputs[0], copy_gbs, mode)
                    hosts = {name: host_overhead_us(call, repeats=400) for name, call in calls.items()}
            else:
                calls = {name: step(fn, mode, inputs, grads, cfg.prenorm) for name, fn in fns.items()}
                timings, copy = timed(calls, device, repeats, cfg, inputs[0], copy_gbs, mode)
                hosts = {}
            for name in fns:
                timing, host = timings[name], hosts.get(name)
                fused = providers.fuses_add(name, cfg)
                nbytes = (fused_bytes if fused else eager_bytes)(cfg, mode)
                gbs = nbytes / (timing.ms * 1e-3) / 1e9
                rows.append(_row(table, cfg, mode, name, fused_add=fused, ms=timing.ms,
                                 spread=timing.spread, host_us=host, bytes=nbytes, gbs=gbs,
                                 copy_gbs=copy, pct_copy=100 * gbs / copy))
    return rows


class CopyBandwidth:
    """The copy bandwidth rows are compared with: on CUDA one 1 GiB clone for every
    row; on CPU a clone of each row's own tensor, timed between the providers' calls
    (see ``timed``) and recorded here."""

    def __init__(self, device: str):
        self.device = device
        self.measured = {}  # bytes per clone -> [GB/s, ...]
        if device.startswith("cuda"):
            self.measured[1 << 30] = [copy_bandwidth_gbs(device, 1 << 30)]

    def __call__(self, cfg: Config, mode: str = "fwd") -> float:
        return self.measured[1 << 30][0]

    def record(self, moved: int, ms: float) -> float:
        """GB/s of a clone that moved ``moved`` bytes (read + written) in ``ms``."""
        if not ms > 0:
            raise RuntimeError(f"a clone of {moved // 2} bytes timed at {ms} ms: too small to time")
        gbs = moved / (ms * 1e-3) / 1e9
        self.measured.setdefault(moved // 2, []).append(gbs)
        return gbs

    def largest(self) -> float:
        """Median over the largest size measured (the CPU sweep's largest if none yet)."""
        if not self.measured:
            self.measured[4 << 24] = [copy_bandwidth_gbs(self.device, 4 << 24)]
        return statistics.median(self.measured[max(self.measured)])

    def summary(self) -> str:
        return "\n".join(
            f"copy bandwidth, clone of {n / 2**20:.3g} MiB: median {statistics.median(v):.1f} "
            f"GB/s over {len(v)} measurement(s), range {min(v):.1f}-{max(v):.1f}"
            for n, v in sorted(self.measured.items()))


def setup_cpu(args) -> None:
    """Fix torch's threads and the allocator's behaviour, and say so."""
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = keep_freed_memory() if args.malloc == "reuse" else "glibc defaults (--malloc system)"
    kernels = ("compiled CPU kernels" if rf.cpu_kernels_available()
               else "PyTorch reference (the CPU kernels are not built)")
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, "
          f"{torch.backends.cpu.get_cpu_capability()}; residual_fused runs the {kernels}; "
          f"allocator: {malloc}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def write_results_page(rows, env, command, base=None) -> str:
    """bench/results/<device>.md, with results.csv, env.json and plots in <device>/."""
    name = _slug(env["gpu"]) if env.get("gpu") else "cpu-" + _slug(env.get("cpu", "unknown"))
    base = base or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    folder = os.path.join(base, name)
    os.makedirs(folder, exist_ok=True)
    report.write_csv(rows, os.path.join(folder, "results.csv"))
    report.write_json(env, os.path.join(folder, "env.json"))
    images = report.plot(rows, env["copy_gbs"], folder, env.get("gpu") or env["device"])
    rel = [os.path.join(name, os.path.basename(p)) for p in images]
    page = os.path.join(base, f"{name}.md")
    with open(page, "w") as f:
        headline = [4096, 8192, 16384] if env.get("gpu") else [4096]
        f.write(report.markdown(rows, env, command, rel, headline_hidden=headline))
    return page


def page_from(folder: str, command: str, base=None) -> str:
    """The results page of a recorded run (no device needed)."""
    rows = report.read_csv(os.path.join(folder, "results.csv"))
    with open(os.path.join(folder, "env.json")) as f:
        env = json.load(f)
    return write_results_page(rows, env, command, base)


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if args.page_from:
        page = page_from(args.page_from, args.command or "(not recorded)", base=args.results_dir)
        print(f"wrote {page}")
        return
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind == "cpu":
        setup_cpu(args)
    if args.overhead:
        from bench import overhead

        rows = overhead.run(device, with_compile="compile" in args.providers)
        print(overhead.format_rows(rows, device))
        return
    if kind == "cuda" and not rf.cuda_kernels_available():
        print("warning: the CUDA kernels are not built; residual_fused runs the reference on CUDA.")
    copy_gbs = CopyBandwidth(device)
    if kind == "cuda":
        print(f"device-to-device copy bandwidth: {copy_gbs.largest():.0f} GB/s ({device}, 1 GiB clone)")

    sweep = [] if args.decode_only else list(sweep_configs(args, kind))
    decode = [] if args.no_decode else list(decode_configs(kind))
    progress = report.Progress(len(sweep) * len(args.modes) + len(decode))
    rows = run_table("sweep", sweep, args.modes, args, copy_gbs, progress)
    rows += run_table("decode", decode, ["fwd"], args, copy_gbs, progress)
    progress.close()
    report.add_speedups(rows)
    if kind == "cpu":
        print(copy_gbs.summary())
    print(report.format_table(rows))
    print(report.LEGEND)
    noisy = [r for r in rows if r["spread"] is not None and r["spread"] > SPREAD_WARNING]
    if noisy:
        print(f"warning: {len(noisy)} of {sum(r['ms'] is not None for r in rows)} timed rows "
              f"vary by more than {SPREAD_WARNING:.0f}% between repeats (column 'spread'); "
              f"another load on this machine is likely. Compare ratios within one run, or "
              f"rerun with more --repeats.")

    env = {**environment(device), "copy_gbs": copy_gbs.largest()}
    command = "python bench/bench_add_norm.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        report.write_csv(rows, os.path.join(args.out, "results.csv"))
        report.write_json(env, os.path.join(args.out, "env.json"))
        images = report.plot(rows, copy_gbs.largest(), args.out, env.get("gpu") or device)
        print(f"wrote {args.out}: results.csv, env.json, {len(images)} plot(s)")
    if args.results:
        page = write_results_page(rows, env, command)
        print(f"wrote {page} and its folder")

if __name__ == "__main__":
    main()
