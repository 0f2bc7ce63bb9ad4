"""Timing that a kernel engineer can trust: warm-up, many repeats, median, cold caches.

On CUDA every repeat is timed with its own pair of events after a write of a
buffer larger than L2, so no repeat reads its inputs from cache; on CPU the
median of ``time.perf_counter`` repeats is used, the providers of a row taking
turns call by call. Every time comes with its spread (the interquartile range over
the median), so a noisy machine shows.
"""

import dataclasses
import statistics
import time
from typing import Callable, Dict, List

import torch

_FLUSH_BYTES = 256 << 20  # larger than the L2 of any current GPU (H100: 50 MB)


@dataclasses.dataclass(frozen=True)
class Timing:
    ms: float  # median
    spread: float  # (q3 - q1) / median, in %


def _stats(samples: List[float]) -> Timing:
    median = statistics.median(samples)
    if len(samples) < 4:
        return Timing(median, 0.0)
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return Timing(median, 100.0 * (q3 - q1) / median if median > 0 else 0.0)


def _cuda_time_ms(fn: Callable[[], object], repeats: int, warmup: int) -> List[float]:
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _cpu_time_ms(fn: Callable[[], object], repeats: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_stats(fn: Callable[[], object], device: str, repeats: int = 50,
               warmup: int = 5) -> Timing:
    """Median milliseconds of one call of ``fn`` on ``device``, with the spread."""
    timer = _cuda_time_ms if device.startswith("cuda") else _cpu_time_ms
    return _stats(timer(fn, repeats, warmup))


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int = 20,
                     warmup: int = 3) -> Dict[str, Timing]:
    """CPU: each of ``fns`` timed ``repeats`` times, taking turns call by call, so a
    shared machine's slow moments fall on every provider alike and their ratios hold."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _stats(times) for name, times in samples.items()}


def time_ms(fn: Callable[[], object], device: str, repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of one call of ``fn`` on ``device``."""
    return time_stats(fn, device, repeats, warmup).ms


def copy_bandwidth_gbs(device: str, nbytes: int, dtype=torch.float32) -> float:
    """Copy bandwidth (bytes read + bytes written per second) of a ``clone`` of
    ``nbytes`` of ``dtype``: the ceiling every row is compared with.

    On CPU a clone allocates its output like every op does; run with freed memory
    kept by the allocator (bench_add_norm.py's ``--malloc reuse``), or large clones
    measure page faults rather than memory. Raises rather than return a
    nonsensical value (a time below the clock's resolution)."""
    src = torch.randn(max(1, nbytes // torch.empty((), dtype=dtype).element_size()),
                      device=device).to(dtype)
    moved = 2 * src.numel() * src.element_size()
    ms = time_ms(lambda: src.clone(), device, repeats=30, warmup=5)
    if not ms > 0:
        raise RuntimeError(f"copy of {moved // 2} bytes timed at {ms} ms: too small to time")
    return moved / (ms * 1e-3) / 1e9


def host_overhead_us(fn: Callable[[], object], repeats: int = 2000) -> float:
    """Median host-side microseconds per call (no device synchronisation)."""
    for _ in range(50):
        fn()
    samples = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(repeats // 20):
            fn()
        samples.append((time.perf_counter() - t0) / (repeats // 20) * 1e6)
    return statistics.median(samples)
