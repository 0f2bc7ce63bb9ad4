"""One GPU call that answers the benchmark's questions (``make gpu-tune``).

    python bench/gpu_tune.py --out bench/out/gpu-tune       # on a CUDA machine
    python bench/gpu_tune.py --dry-run                      # anywhere: the plan, predicted

GPU machines are lent rarely and briefly, so one run measures, side by side and in
priority order: eager PyTorch, torch.compile of the same eager code, this library
and every peer that imports there (Liger-Kernel, QuACK, Apex, TransformerEngine,
flash-attn's Triton norm), over the sweep of hidden sizes, norms, forms, directions
and dtype mixes, and the decode shapes.

How a run is organised:

* **Jobs in priority order.** A job is one config (norm, form, dtype mix, rows x
  hidden) with its directions. bf16 comes first, then the decode shapes, then bf16
  with an fp32 residual stream, fp16 and fp32. Each job's device seconds are
  predicted from its bytes (``predict_seconds``); a job that would overrun the
  deadline is not started, and the jobs after it are still tried (smaller ones may fit).
* **One deadline, stage limits.** ``--deadline`` seconds from the start; each stage
  also has its own limit (``STAGE_LIMITS``), so a stage that takes longer than
  planned cannot starve the rest.
* **Results as they come.** Every finished job appends its rows to
  ``results.csv`` at once; a cut-off run still returns what it measured, and a rerun
  with the same ``--out`` resumes after the jobs already there.
* **torch.compile without waiting for it.** Worker processes compile every job's
  eager code from the start of the run (filling inductor's on-disk cache), while the
  main process times the other providers; the compiled provider is timed in a second
  pass, where its graphs load from the cache. It is never skipped for time: a job's
  compile row waits for its worker (the deadline decides only which jobs start).
* **Copy bandwidth at each row's own size.** The % of copy compares each row with a
  device-to-device clone that moves the same number of bytes as the row's floor
  (cached per size), not one 1 GiB copy.
* **Correctness first.** The library's forward and backward are checked against the
  float64 reference on three sizes per dtype mix before anything is timed; every
  provider's forward is checked again per job (bench_add_norm.check_output).

Kernel variants (csrc/kernels/variant.h, candidates in bench/variants.py): the
correctness stage checks every candidate of each direction against the float64
reference on three sizes (a wrong one is reported and never timed or chosen); the
sweep times every candidate beside the rule for the jobs of ``--variant-dtypes``
(rows ``residual_fused[<variant>]``, with what ran in the ``variant`` column; a
variant that cannot run a shape is a row that says why), the sizes where the
calibrated performance model predicts the largest gain over the rule first
(bench/predicted_variants.json). ``bench/make_table.py``
turns the CSV into the table dispatch follows. The dry run prints the plan: the
stages, the jobs that fit the deadline and the predicted device seconds (the model's
assumptions are in ``DeviceModel``; they are predictions, not measurements).
"""

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional

import torch

if __name__ == "__main__":  # run as a script: bench and tools are packages of the repository root
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import bench_add_norm as bench  # noqa: E402
from bench import providers, report, variants  # noqa: E402
from bench.byte_model import MODES, Config, eager_bytes, fused_bytes  # noqa: E402

HIDDEN = (512, 768, 1024, 2048, 2560, 4096, 5120, 8192, 12288, 16384, 24576, 32768, 65536, 131072, 262144)
ELEMENTS = 1 << 26  # rows * hidden of each sweep config
DECODE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_HIDDEN = (2048, 4096, 8192)
#: dtype mixes in priority order (bench_add_norm.DTYPES keys).
DTYPE_ORDER = ("bf16", "bf16-fp32res", "fp16", "fp32")
#: the kernel variants checked and timed per direction ("rule": the documented rule)
VARIANTS = variants.CANDIDATES
VARIANT_DTYPES = ("bf16",)  # the sweep jobs whose variants are all timed
CORRECTNESS_HIDDEN = (768, 8200, 65536)  # a rows kernel, an unaligned-to-the-chunk size, a cluster
STAGES = ("correct", "sweep", "page")
#: each stage's own limit, seconds (capped by what is left before the deadline).
STAGE_LIMITS = {"correct": 50, "sweep": 300, "page": 20}
REPEATS = 30
VARIANT_REPEATS = 20  # each variant's timed calls (a median still; more variants fit)
#: the variant jobs run in the order of the gain the calibrated model predicts for the
#: best candidate over the rule (bench/predicted_variants.json, bench/sass_audit.py
#: --variants); equal gains in this order of (norm, form), then of hidden size
VARIANT_FORMS = (("rms", True), ("layer", True), ("layer", False), ("rms", False))
PREDICTED_VARIANTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "predicted_variants.json")


@dataclasses.dataclass(frozen=True)
class Job:
    table: str  # "sweep" or "decode"
    priority: float  # lower runs first
    cfg: Config
    modes: tuple
    tune: bool = False  # the job times the library's kernel variants (not the providers)

    @property
    def key(self) -> str:
        """The job: its rows' key without mode and provider."""
        return self.row_key("", "").rsplit("|", 2)[0] + ("|variants" if self.tune else "")

    def row_key(self, mode: str, provider: str) -> str:
        """The key of the CSV row this job writes for (mode, provider)."""
        return row_key(bench._row(self.table, self.cfg, mode, provider))


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """What a prediction assumes (an H100 unless told otherwise). Not measured here:
    adjust from the first run's stage times (they are written to stages.json)."""
    copy_gbs: float = 3000.0  # device copy bandwidth
    efficiency: float = 0.6  # fraction of it a timed provider reaches (conservative)
    flush_ms: float = 0.12  # the 256 MiB L2 flush before every timed call
    call_ms: float = 0.03  # launch and host time per call
    setup_s: float = 0.08  # per job and provider: inputs, the float64 check, building the call
    compile_load_s: float = 0.6  # per job and direction: dynamo trace and cached graph load
    warmup: int = 5

    # share of a direction's candidates that can run a sweep shape: 381 of 630 on the
    # emulated H100's plans over HIDDEN (bf16 LayerNorm, pre-norm)
    variant_applies: float = 0.6
    variant_check_s: float = 0.03  # per variant and mode: its output checked against the rule's
    check_s: float = 0.1  # per correctness check (one variant, dtype, size, norm)

    def variant_seconds(self, job: Job, repeats: int) -> float:
        """Timing every candidate variant of the job's fwd and bwd modes."""
        seconds = 0.0
        for mode in job.modes:
            call = fused_bytes(job.cfg, mode) / (self.copy_gbs * 1e9 * self.efficiency) * 1e3 + self.call_ms
            timed = 1 + (len(VARIANTS[mode]) - 1) * self.variant_applies  # the rule always runs
            seconds += timed * ((repeats + self.warmup) * (call + self.flush_ms) * 1e-3 + self.variant_check_s)
        return seconds

    def provider_seconds(self, job: Job, provider: str, repeats: int) -> float:
        seconds = self.setup_s
        for mode in job.modes:
            nbytes = (fused_bytes if providers.fuses_add(provider, job.cfg) else eager_bytes)(job.cfg, mode)
            call = nbytes / (self.copy_gbs * 1e9 * self.efficiency) * 1e3 + self.call_ms + self.flush_ms
            seconds += (repeats + self.warmup) * call * 1e-3
        if provider == "compile":
            seconds += self.compile_load_s * (2 if any(m != "fwd" for m in job.modes) else 1)
        return seconds


def predicted_gain(norm: str, hidden: int, modes: Iterable[str], path: str = PREDICTED_VARIANTS) -> float:
    """Points of copy bandwidth the calibrated model predicts the best candidate variant
    gains over the rule at this size (bench/predicted_variants.json, pre-norm; the
    largest over ``modes``); 0 without a prediction."""
    predicted = _predicted_variants(path)
    gains = [0.0]
    for mode in modes:
        by_variant = predicted.get(f"{mode}|{norm}|{hidden}", {})
        if "rule" in by_variant:
            gains.append(max(by_variant.values()) - by_variant["rule"])
    return round(max(gains), 1)  # the predictions have one decimal


@functools.lru_cache(maxsize=None)
def _predicted_variants(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as why:  # the order is a heuristic: a bad file must not stop a run
        print(f"gpu-tune: {path} unreadable ({why}); variant jobs in the order of the forms")
        return {}


def plan_jobs(hidden: Iterable[int] = HIDDEN, dtypes: Iterable[str] = DTYPE_ORDER, decode: bool = True,
              modes: Iterable[str] = MODES, elements: int = ELEMENTS,
              variant_dtypes: Iterable[str] = VARIANT_DTYPES) -> List[Job]:
    """Every job of a run, in the order they run: the main dtype's sweep, the decode
    shapes, the kernel variants of the ``variant_dtypes`` sweep (fwd and bwd), then the
    other dtype mixes."""
    jobs = []
    tuned_modes = tuple(m for m in modes if m in VARIANTS)
    for rank, name in enumerate(dtypes):
        for h in hidden:
            for norm in ("rms", "layer"):
                for prenorm in (True, False):
                    cfg = bench.mix_config(name, norm=norm, prenorm=prenorm, rows=max(1, elements // h), hidden=h)
                    jobs.append(Job("sweep", 2 * rank if rank else 0, cfg, tuple(modes)))
                    if name in variant_dtypes and tuned_modes:
                        rank_form = VARIANT_FORMS.index((norm, prenorm))
                        gain = predicted_gain(norm, h, tuned_modes)
                        jobs.append(Job("sweep", 1.9 - min(gain, 39.0) / 100 + 0.0001 * rank_form, cfg,
                                        tuned_modes, tune=True))
        if rank == 0 and decode:  # serving shapes right after the main dtype
            for h in DECODE_HIDDEN:
                for rows in DECODE_ROWS:
                    jobs.append(Job("decode", 1, Config(norm="rms", prenorm=True, rows=rows, hidden=h), ("fwd",)))
                    jobs.append(Job("decode", 1, Config(norm="layer", prenorm=False, rows=rows, hidden=h), ("fwd",)))
    return sorted(jobs, key=lambda j: j.priority)


def job_seconds(job: Job, names: List[str], model: DeviceModel, repeats: int) -> float:
    """A job's predicted device seconds: its providers', or its variants' (none
    without the library among the providers; VARIANT_REPEATS calls each)."""
    if job.tune:
        return model.variant_seconds(job, min(repeats, VARIANT_REPEATS)) if "residual_fused" in names else 0.0
    return sum(model.provider_seconds(job, name, repeats) for name in names)


def schedule(jobs: List[Job], names: List[str], model: DeviceModel, budget_s: float, repeats: int = REPEATS):
    """(jobs that fit in budget_s in order, jobs cut, predicted seconds of those that fit)."""
    kept, cut, total = [], [], 0.0
    for job in jobs:
        seconds = job_seconds(job, names, model, repeats)
        if total + seconds <= budget_s:
            kept.append(job)
            total += seconds
        else:
            cut.append(job)
    return kept, cut, total


def probe_peers() -> Dict[str, str]:
    """Which peers import here: name -> version, or why not."""
    found = {}
    for name, module in (("liger", "liger_kernel"), ("quack", "quack"), ("apex", "apex"),
                         ("transformer_engine", "transformer_engine"), ("flash_attn", "flash_attn")):
        try:
            mod = importlib.import_module(module)
            found[name] = str(getattr(mod, "__version__", "installed"))
        except Exception as err:  # not installed, or broken: both mean "not here"
            found[name] = f"not available ({type(err).__name__})"
    return found


# ---- compile warm-up, in worker processes ------------------------------------------

def _worker_init() -> None:
    # One compile thread per worker: N workers with inductor's default pool (one
    # process per core each) would oversubscribe the machine and jitter the host
    # times the main process measures.
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"


def _warm(cfg: Config, modes: tuple, table: str, device: str) -> float:
    """Compile the eager provider's code for cfg as the timed pass will run it, so
    that pass loads every graph from inductor's on-disk cache: the inference graph
    (the forward check, and decode rows, run without grad) and, for the sweep, the
    training forward and backward. Returns seconds."""
    t0 = time.perf_counter()
    inputs, grads = bench.make_inputs(cfg, device)
    fn = providers.make("compile", cfg, device)
    with torch.no_grad():
        fn(*inputs)
    if table != "decode":
        for mode in modes:
            bench.step(fn, mode, inputs, grads, cfg.prenorm)()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class Warmers:
    """Worker processes compiling jobs' graphs, in the jobs' order."""

    def __init__(self, jobs: List[Job], device: str, workers: int):
        self.futures, self.pool = {}, None
        if workers <= 0 or not jobs:
            return
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init)
        for job in jobs:
            self.futures[job.key] = self.pool.submit(_warm, job.cfg, job.modes, job.table, device)

    def ready(self, job: Job) -> bool:
        """Whether the job's graphs are compiled (or no worker compiles them)."""
        future = self.futures.get(job.key)
        return future is None or future.done()

    def wait(self, job: Job, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the job's graphs; True when ready."""
        future = self.futures.get(job.key)
        if future is None:
            return True
        try:
            future.result(timeout=max(0.0, timeout))
        except TimeoutError:
            return False
        except Exception as err:  # the timed pass compiles it itself, and reports any error
            print(f"warm-up of {job.key} failed in its worker: {type(err).__name__}: {err}"[:300])
        return True

    def close(self) -> None:
        """Stop the workers now: queued and running compiles alike (an exiting
        interpreter would otherwise wait for every one of them)."""
        if self.pool is None:
            return
        processes = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=5)
        self.pool = None


# ---- the run ----------------------------------------------------------------------

class Clock:
    """Seconds since the run started and seconds left. ``end_at``: an absolute end
    (epoch seconds, from scripts/gpu_tune.sh, so the build and the imports count),
    else ``deadline_s`` from now."""

    def __init__(self, deadline_s: float, end_at: Optional[float] = None, now: Callable[[], float] = time.time):
        self.now, self.start = now, now()
        self.end = end_at if end_at is not None else self.start + deadline_s

    def elapsed(self) -> float:
        return self.now() - self.start

    def left(self) -> float:
        return self.end - self.now()


#: what identifies a CSV row (bench_add_norm._row's fields)
ROW_KEY = ("table", "norm", "form", "dtype", "rows", "hidden", "mode", "provider")


def row_key(row: dict) -> str:
    return "|".join(str(row[k]) for k in ROW_KEY)


def done_keys(csv_path: str) -> set:
    """(job, mode, provider) keys a previous run settled: measured, or not available
    (a provider that failed is tried again)."""
    if not os.path.exists(csv_path):
        return set()
    return {row_key(r) for r in report.read_csv(csv_path)
            if r["ms"] is not None or not str(r["note"]).startswith("failed")}


def machine_of(env: dict) -> str:
    return env.get("gpu") or env.get("cpu") or env.get("device", "unknown")


def start_or_resume(out: str, env: dict) -> str:
    """results.csv to append to: the previous run's when it ran on this kind of
    machine; otherwise that file is kept aside (results.<its machine>.csv)."""
    csv_path, env_path = os.path.join(out, "results.csv"), os.path.join(out, "env.json")
    if os.path.exists(csv_path) and os.path.exists(env_path):
        with open(env_path) as f:
            before = machine_of(json.load(f))
        if before != machine_of(env):
            aside = os.path.join(out, f"results.{bench._slug(before)}.csv")
            os.replace(csv_path, aside)
            print(f"results.csv came from {before}, not {machine_of(env)}: kept aside as {aside}")
    return csv_path


class RowCopyBandwidth(bench.CopyBandwidth):
    """The copy bandwidth a row is compared with. CUDA: a clone moving as many bytes
    as the row's floor (its own mode), measured once per size (4 KiB steps), not one
    1 GiB clone. CPU: as bench_add_norm (the clone of the row's input, timed between
    the providers' calls and recorded)."""

    def __init__(self, device: str):
        self.device, self.measured = device, {}

    def __call__(self, cfg: Config, mode: str = "fwd") -> float:
        size = max(4096, (fused_bytes(cfg, mode) // 2) >> 12 << 12)  # bytes read (= written)
        if size not in self.measured:
            self.measured[size] = [bench.copy_bandwidth_gbs(self.device, size, dtype=torch.uint8)]
        return self.measured[size][0]


def tuning_entry(device: str) -> Optional[variants.Entry]:
    """The library's variant entry points where its CUDA kernels are loaded, else None."""
    if not device.startswith("cuda"):
        return None
    try:
        return variants.loaded()
    except (RuntimeError, OSError, AttributeError):
        return None


def _refusal(err: Exception) -> bool:
    """Whether an error is the library refusing a variant for a shape it cannot run."""
    return "the tuning variant" in str(err)


def correctness(device: str, dtypes: Iterable[str], clock: Optional[Clock] = None, end: float = 1e18,
                variant_dtypes: Iterable[str] = VARIANT_DTYPES) -> List[dict]:
    """The rule's forward and backward against the float64 reference in every dtype
    mix, then every candidate variant of each direction in ``variant_dtypes`` (where
    the CUDA kernels are loaded). Verdicts: ok; WRONG: why; n/a: why the variant cannot
    run that shape; not checked (stage limit)."""
    entry = tuning_entry(device)
    dtypes = list(dtypes)
    checks = [("both", "rule", name) for name in dtypes]
    if entry is not None:
        checks += [(d, v, name) for name in variant_dtypes if name in dtypes
                   for d, names in VARIANTS.items() for v in names if v != "rule"]
    results = []
    for direction, variant, name in checks:
        for h in CORRECTNESS_HIDDEN:
            for norm in ("rms", "layer"):
                where = dict(direction=direction, variant=variant, dtype=name, hidden=h, norm=norm)
                if clock is not None and clock.now() > end:
                    results.append(dict(where, verdict="not checked (stage limit)"))
                    continue
                cfg = bench.mix_config(name, norm=norm, prenorm=True, rows=64, hidden=h)
                forced = entry.override(direction, variant) if direction != "both" else contextlib.nullcontext()
                try:
                    inputs, grads = bench.make_inputs(cfg, device)
                    fn = providers.make("residual_fused", cfg, device)
                    with forced:
                        if direction in ("both", "fwd"):
                            bench.check_output("residual_fused", cfg, fn, inputs)
                        if direction in ("both", "bwd"):
                            check_backward(cfg, fn, inputs, grads)
                    verdict = "ok"
                except providers.Unavailable as why:
                    verdict = f"WRONG: {why}"
                except Exception as err:  # an error is a wrong variant too, and the run goes on
                    verdict = (f"n/a: {err}" if _refusal(err) else f"WRONG: {type(err).__name__}: {err}")[:300]
                results.append(dict(where, verdict=verdict))
    return results


def _outputs(call) -> List[torch.Tensor]:
    return [t.detach().clone() for t in bench._as_tuple(call()) if t is not None]


def run_variants(job: Job, device: str, repeats: int, copy: "RowCopyBandwidth", entry: variants.Entry,
                 skip: Callable[[str, str], bool], wrong: set) -> List[dict]:
    """Every candidate variant of the job's fwd and bwd modes, and the rule itself (under
    the override: the baseline of bench/make_table.py, whatever table the library
    has), timed as the library's own row is: rows ``residual_fused[<variant>]`` with
    what ran in ``variant``. A variant
    that cannot run the shape, whose outputs differ from the rule's, or that the
    correctness stage found wrong, is a row that says so (never timed)."""
    cfg = job.cfg
    inputs, grads = bench.make_inputs(cfg, device)
    fn = providers.make("residual_fused", cfg, device)
    rows = []
    for mode in (m for m in job.modes if m in VARIANTS):
        rule = _outputs(bench.step(fn, mode, inputs, grads, cfg.prenorm))
        nbytes = fused_bytes(cfg, mode)
        for v in VARIANTS[mode]:
            name = variants.provider_name(v)
            if skip(mode, name):
                continue
            if (mode, v) in wrong:
                rows.append(bench._row(job.table, cfg, mode, name, note="WRONG in the correctness stage: not timed"))
                continue
            try:
                with entry.override(mode, v):
                    call = bench.step(fn, mode, inputs, grads, cfg.prenorm)
                    for want, got in zip(rule, _outputs(call)):
                        err = (got.double() - want.double()).abs().max().item()
                        tol = bench.TOLERANCE.get(got.dtype, 1e-4) * max(1.0, want.double().abs().max().item())
                        if not err <= tol:
                            raise providers.Unavailable(f"differs from the rule's output by {err:.3g}")
                    timing = bench.time_stats(call, device, repeats=repeats)
                    ran = entry.last(mode)
            except providers.Unavailable as why:
                rows.append(bench._row(job.table, cfg, mode, name, note=f"WRONG: {why}"))
                continue
            except Exception as err:
                note = f"refused: {err}" if _refusal(err) else f"failed: {type(err).__name__}: {err}"
                rows.append(bench._row(job.table, cfg, mode, name, note=note[:200]))
                continue
            gbs = nbytes / (timing.ms * 1e-3) / 1e9
            copy_gbs = copy(cfg, mode)
            rows.append(bench._row(job.table, cfg, mode, name, fused_add=True, ms=timing.ms, spread=timing.spread,
                                   bytes=nbytes, gbs=gbs, copy_gbs=copy_gbs, pct_copy=100 * gbs / copy_gbs,
                                   variant=ran))
    return rows


def check_backward(cfg: Config, fn, inputs, grads) -> None:
    """The library's input gradients against float64 autograd of the reference."""
    ref = bench.rf.reference.add_rms_norm if cfg.norm == "rms" else bench.rf.reference.add_layer_norm
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    args = leaves[:3] if cfg.norm == "rms" else leaves
    want = torch.autograd.grad(bench._as_tuple(ref(*args, providers.EPS[cfg.norm], prenorm=True)),
                               args, [g.double() for g in grads])
    got = torch.autograd.grad(bench._as_tuple(fn(*inputs)), inputs[:len(args)], grads)
    for name, g, w in zip(("dx", "dresidual", "dweight", "dbias"), got, want):
        err = (g.double() - w).abs().max().item()
        tol = bench.TOLERANCE.get(g.dtype, 1e-4) * max(1.0, w.abs().max().item())
        if not err <= tol:
            raise providers.Unavailable(f"{name} differs from the reference by {err:.3g}")


def run_job(job: Job, names: List[str], modes: List[str], device: str, repeats: int,
            copy: RowCopyBandwidth, entry: Optional[variants.Entry] = None) -> List[dict]:
    """Time one job's providers (bench_add_norm's row logic, with per-row copy). An
    error is a row that says so (and is tried again by a resumed run), not a lost run.
    With the library's entry points, its rows say which variant the rule ran."""
    args = argparse.Namespace(device=device, repeats=repeats, providers=names)
    try:
        rows = bench.run_table(job.table, [job.cfg], modes, args, copy, _Quiet())
    except Exception as err:
        note = f"failed: {type(err).__name__}: {err}"[:160]
        return [bench._row(job.table, job.cfg, mode, name, note=note) for name in names for mode in modes]
    if entry is not None:  # the rule's choice depends on the shape alone: the last launch's
        ran = {"fwd": entry.last("fwd"), "bwd": entry.last("bwd")}
        ran["fwd+bwd"] = f"{ran['fwd']} + {ran['bwd']}"
        for r in rows:
            if r["provider"] == "residual_fused" and r["ms"] is not None:
                r["variant"] = ran.get(r["mode"], "")
    return rows


def compile_cache_counters() -> dict:
    """This process's compile-cache lookups: a miss is a cold compile in the timed
    pass (its graphs should all come from the workers' cache)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {"aot_autograd_hits": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_autograd_misses": counters["aot_autograd"]["autograd_cache_miss"],
            "inductor_hits": counters["inductor"]["fxgraph_cache_hit"],
            "inductor_misses": counters["inductor"]["fxgraph_cache_miss"]}


class _Quiet:
    def step(self, label):
        pass


#: seconds the sweep leaves for the results page
PAGE_RESERVE_S = 15.0
#: seconds scripts/gpu_tune.sh keeps between the run's end and the hard limit
MARGIN_S = 15.0


def run(args) -> dict:
    """The whole run; returns what happened (also in stages.json, rewritten after
    every stage and job so that a run cut off from outside keeps it)."""
    device = args.device
    clock = Clock(args.deadline, args.end_at)
    os.makedirs(args.out, exist_ok=True)
    summary = {"stages": {}, "deadline_s": round(clock.left(), 1), "measured_jobs": 0, "cut": []}
    stages_path = os.path.join(args.out, "stages.json")
    env = bench.environment(device)
    env["peers"] = probe_peers()
    env["variants"] = {d: list(v) for d, v in VARIANTS.items()}
    entry = tuning_entry(device) if "residual_fused" in args.providers else None
    env["tuned_table"] = entry.table_source() if entry is not None else None
    csv_path = start_or_resume(args.out, env)
    report.write_json(env, os.path.join(args.out, "env.json"))
    names = [n for n in ("eager", "compile", "residual_fused") if n in args.providers]
    names += [n for n in providers.PROVIDERS if n in args.providers and n not in names and device.startswith("cuda")
              and not env["peers"].get(n, "not available").startswith("not available")]
    model = DeviceModel()
    jobs = plan_jobs(args.hidden, args.dtypes, not args.no_decode, args.modes, args.elements,
                     args.variant_dtypes if entry is not None else ())
    done = done_keys(csv_path)

    def missing(job, which):
        return {n: [m for m in job.modes if job.row_key(m, n) not in done] for n in which}

    def variants_missing(job):
        return "residual_fused" in names and any(job.row_key(m, variants.provider_name(v)) not in done
                                                 for m in job.modes for v in VARIANTS[m])

    todo = [j for j in jobs if (variants_missing(j) if j.tune else any(missing(j, names).values()))]
    summary["resumed_past"] = len(jobs) - len(todo)
    budget = clock.left() - STAGE_LIMITS["correct"] - PAGE_RESERVE_S
    planned, _, _ = schedule(todo, names, model, max(0.0, min(STAGE_LIMITS["sweep"], budget)), args.repeats)
    # workers compile only what the plan expects to reach, from the start of the run
    warmers = Warmers([j for j in planned if not j.tune and missing(j, ["compile"]).get("compile")]
                      if "compile" in names else [], device, args.compile_workers)

    def stage(name, fn, reserve=0.0):
        limit = min(STAGE_LIMITS[name], clock.left() - reserve)
        t0 = clock.elapsed()
        if limit < 1:
            summary["stages"][name] = {"skipped": "deadline"}
            return None
        result = fn(clock.now() + limit)
        summary["stages"][name] = {"seconds": round(clock.elapsed() - t0, 1), "limit": round(limit, 1)}
        report.write_json(summary, stages_path)
        return result

    try:
        checked = stage("correct", lambda end: correctness(device, args.dtypes, clock, end, args.variant_dtypes),
                        reserve=PAGE_RESERVE_S) or []
        summary["correctness"] = {
            "checked": sum(not r["verdict"].startswith("not checked") for r in checked),
            "wrong": [r for r in checked if r["verdict"].startswith("WRONG")],
            "not_applicable": sum(r["verdict"].startswith("n/a") for r in checked),
            "not_checked": sum(r["verdict"].startswith("not checked") for r in checked)}
        report.write_json(checked, os.path.join(args.out, "correctness.json"))
        wrong = {(r["direction"], r["variant"]) for r in summary["correctness"]["wrong"]}

        def sweep_stage(end):
            copy = RowCopyBandwidth(device)
            pending = []  # jobs whose compile rows wait for their worker
            measured = set()

            def time_job(job, which):
                want = {} if job.tune else {n: ms for n, ms in missing(job, which).items() if ms}
                if not want and not (job.tune and variants_missing(job)):
                    return True
                need = job_seconds(job, list(want) or names, model, args.repeats)
                if clock.now() + need > end:
                    summary["cut"].append(f"{job.key}|{'+'.join(want) or 'variants'}")
                    return False
                if job.tune:
                    rows = run_variants(job, device, min(args.repeats, VARIANT_REPEATS), copy, entry,
                                        lambda mode, name: job.row_key(mode, name) in done, wrong)
                else:
                    modes = [m for m in job.modes if any(m in ms for ms in want.values())]
                    rows = run_job(job, list(want), modes, device, args.repeats, copy, entry)
                report.write_csv(rows, csv_path, append=True)
                measured.add(job.key)
                done.update(row_key(r) for r in rows if r["ms"] is not None or not r["note"].startswith("failed"))
                return True

            def drain(block_until_ready: bool):
                for job in list(pending):
                    if block_until_ready and not warmers.wait(job, end - clock.now() - 1):
                        break
                    if warmers.ready(job):
                        pending.remove(job)
                        time_job(job, ["compile"])

            for job in todo:  # priority order; each job's compile rows as soon as its graphs are ready
                ran = time_job(job, [n for n in names if n != "compile"])
                if "compile" in names and ran and not job.tune:
                    pending.append(job)
                drain(block_until_ready=False)
                summary["measured_jobs"] = len(measured)
                report.write_json(summary, stages_path)
            drain(block_until_ready=True)
            summary["measured_jobs"] = len(measured)
            for job in pending:
                summary["cut"].append(f"{job.key}|compile (its graphs were not ready in time)")

        stage("sweep", sweep_stage, reserve=PAGE_RESERVE_S)
    finally:
        warmers.close()

    def page_stage(end):
        rows = report.read_csv(csv_path) if os.path.exists(csv_path) else []
        latest = {}
        for r in rows:  # a job tried again replaces its failed rows
            latest[row_key(r)] = r
        rows = list(latest.values())
        if not rows:
            return 0
        report.add_speedups(rows)
        copies = [r["copy_gbs"] for r in rows if r["copy_gbs"]]
        page_env = dict(env, copy_gbs=max(copies) if copies else 0.0)
        report.write_json(page_env, os.path.join(args.out, "env.json"))
        page = bench.write_results_page(rows, page_env, "make gpu-tune (bench/gpu_tune.py)",
                                        base=os.path.join(args.out, "page"))
        with open(page, "a") as f:
            f.write("\n" + "\n".join(versus_best(rows)) + "\n")
            f.write("\n" + "\n".join(variant_summary(rows)) + "\n")
        summary["page"] = page
        if env.get("gpu"):  # the table this run gives, for csrc/kernels/tuned_table.h
            from bench import make_table

            table = os.path.join(args.out, "tuned_table.h")
            with open(table, "w") as f:
                f.write(make_table.build([csv_path]))
            summary["tuned_table"] = table
        return len(rows)

    stage("page", page_stage)
    summary["compile_cache"] = compile_cache_counters()
    summary["elapsed_s"] = round(clock.elapsed(), 1)
    report.write_json(summary, stages_path)
    return summary


def versus_best(rows: List[dict], ours: str = "residual_fused") -> List[str]:
    """Markdown: for every timed row, ours against the fastest other provider."""
    groups = {}
    for r in rows:
        if r["ms"] is not None:
            key = tuple(r[k] for k in ("table", "norm", "form", "mode", "dtype", "rows", "hidden"))
            groups.setdefault(key, {})[r["provider"]] = r
    out = ["## Ours against the fastest other provider", "",
           "| table | norm | form | mode | dtype | rows | hidden | ours | % of copy | best other | its time "
           "| ours / best |", "|" + "---|" * 12]
    for key, by_name in groups.items():
        mine = by_name.get(ours)
        others = [r for name, r in by_name.items() if name != ours and variants.variant_of_provider(name) is None]
        if mine is None or not others:
            continue
        best = min(others, key=lambda r: r["ms"])
        out.append("| " + " | ".join(map(str, key)) + f" | {mine['ms'] * 1e3:.1f} us | {mine['pct_copy']:.0f}% | "
                   f"{best['provider']} | {best['ms'] * 1e3:.1f} us | {mine['ms'] / best['ms']:.2f} |")
    return out


def variant_summary(rows: List[dict], ours: str = "residual_fused") -> List[str]:
    """Markdown: for every row whose variants were timed, the rule's time and variant
    against the fastest variant (what bench/make_table.py would pick, before its margin)."""
    groups = {}
    for r in rows:
        key = tuple(r[k] for k in ("table", "norm", "form", "mode", "dtype", "rows", "hidden"))
        groups.setdefault(key, []).append(r)
    out = ["## Kernel variants: the rule against the fastest variant", "",
           "| table | norm | form | mode | dtype | rows | hidden | rule | its variant | fastest variant | its time "
           "| % of copy | rule / fastest | timed | refused |", "|" + "---|" * 15]
    for key, group in groups.items():
        rule = next((r for r in group if r["provider"] == ours and r["ms"] is not None), None)
        tried = [r for r in group if variants.variant_of_provider(r["provider"]) is not None]
        timed = [r for r in tried if r["ms"] is not None]
        if rule is None or not timed:
            continue
        best = min(timed, key=lambda r: r["ms"])
        out.append("| " + " | ".join(map(str, key)) + f" | {rule['ms'] * 1e3:.1f} us | {rule.get('variant') or '?'} | "
                   f"{best.get('variant') or variants.variant_of_provider(best['provider'])} | "
                   f"{best['ms'] * 1e3:.1f} us | {best['pct_copy']:.0f}% | {rule['ms'] / best['ms']:.2f} | "
                   f"{len(timed)} | {sum(str(r['note']).startswith('refused') for r in tried)} |")
    return out


def dry_run(args) -> dict:
    """The plan and its predicted device seconds, without a device. The run's budget
    is the deadline less the build (``--build-seconds``, done before this script by
    scripts/gpu_tune.sh) and the first stages' limits."""
    peers = [n for n in args.providers if n not in ("eager", "compile", "residual_fused")]
    names = [n for n in ("eager", "compile", "residual_fused") if n in args.providers]
    model = DeviceModel()
    tuned = [n for n in args.variant_dtypes if n in args.dtypes] if "residual_fused" in names else []
    jobs = plan_jobs(args.hidden, args.dtypes, not args.no_decode, args.modes, args.elements, tuned)
    checks = len(args.dtypes) + len(tuned) * sum(len(v) - 1 for v in VARIANTS.values())
    fixed = {"build": float(args.build_seconds), "imports and env": 10.0,
             "correct": min(STAGE_LIMITS["correct"], model.check_s * checks * len(CORRECTNESS_HIDDEN) * 2),
             "page": PAGE_RESERVE_S, "margin": MARGIN_S}
    budget = max(0.0, min(STAGE_LIMITS["sweep"], args.deadline - sum(fixed.values())))
    kept, cut, sweep_s = schedule(jobs, names, model, budget, args.repeats)
    with_peer, _, _ = schedule(jobs, names + ["liger"], model, budget, args.repeats)
    total = sweep_s + sum(fixed.values())
    by_table = {}
    for job in kept:
        table = "variants" if job.tune else job.table
        by_table[table] = by_table.get(table, 0) + 1
    plan = {
        "variants": {d: list(v) for d, v in VARIANTS.items()},
        "variants_timed_for": tuned,
        "jobs_timing_variants": sum(j.tune for j in kept),
        "stages": ["build", "imports and env"] + list(STAGES),
        "providers": names,
        "jobs": len(jobs),
        "jobs_that_fit": len(kept),
        "jobs_that_fit_by_table": by_table,
        "jobs_cut": len(cut),
        "first_cut": cut[0].key if cut else None,
        "jobs_that_fit_with_liger": len(with_peer),
        "predicted_seconds": {**{k: round(v, 1) for k, v in fixed.items()}, "sweep": round(sweep_s, 1),
                              "total": round(total, 1)},
        "deadline_s": args.deadline,
        "model": dataclasses.asdict(model),
    }
    print(f"gpu-tune dry run: variants {', '.join(f'{d} {len(v)}' for d, v in VARIANTS.items())} "
          f"(bench/variants.py), each checked on {len(CORRECTNESS_HIDDEN)} sizes and timed in the "
          f"{'/'.join(tuned) or 'no'} sweep jobs ({plan['jobs_timing_variants']} fit); providers "
          f"{', '.join(names)}, plus the peers that import on the machine ({', '.join(peers) or 'none asked'})")
    print(f"jobs: {len(jobs)} planned; {len(kept)} fit the sweep's {budget:.0f} s "
          f"({', '.join(f'{k} {v}' for k, v in by_table.items())}; {len(with_peer)} with Liger beside them); "
          f"{len(cut)} cut{', the first ' + cut[0].key if cut else ''}")
    print("predicted device seconds (DeviceModel's assumptions, not a measurement): "
          + ", ".join(f"{k} {v}" for k, v in plan["predicted_seconds"].items())
          + f"; deadline {args.deadline:.0f} s")
    return plan


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/out/gpu-tune")
    p.add_argument("--deadline", type=float, default=360.0, help="seconds from the start for the whole run")
    p.add_argument("--end-at", type=float, help="instead: the run's end, in epoch seconds (scripts/gpu_tune.sh)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its predicted device time")
    p.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPE_ORDER), choices=list(bench.DTYPES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--providers", nargs="+", default=list(providers.PROVIDERS), choices=list(providers.PROVIDERS))
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--variant-dtypes", nargs="*", default=list(VARIANT_DTYPES), choices=list(bench.DTYPES),
                   help="the sweep jobs whose kernel variants are all timed (none: the rule only)")
    p.add_argument("--elements", type=int, default=ELEMENTS, help="rows * hidden per sweep job")
    p.add_argument("--compile-workers", type=int, default=max(0, min(12, (os.cpu_count() or 2) - 2)))
    p.add_argument("--build-seconds", type=float, default=120.0,
                   help="dry run: the build's predicted seconds, counted against the deadline")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        plan = dry_run(args)
        print(json.dumps(plan["predicted_seconds"]))
        return plan
    summary = run(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "cut"}, indent=1))
    if summary.get("cut"):
        print(f"{len(summary['cut'])} job(s) cut by the deadline, the first: {summary['cut'][0]}")
    return summary


if __name__ == "__main__":
    main()
