"""Timing that a kernel engineer can trust: warm-up, many repeats, median, cold caches.

On CUDA every repeat is timed with its own pair of events after a write of a
buffer larger than L2, so no repeat reads its inputs from cache; on CPU the
median of ``time.perf_counter`` repeats is used.
"""

import statistics
import time
from typing import Callable

import torch

_FLUSH_BYTES = 256 << 20  # larger than the L2 of any current GPU (H100: 50 MB)


def _cuda_time_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
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
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _cpu_time_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms(fn: Callable[[], object], device: str, repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of one call of ``fn`` on ``device``."""
    if device.startswith("cuda"):
        return _cuda_time_ms(fn, repeats, warmup)
    return _cpu_time_ms(fn, repeats, warmup)


def copy_bandwidth_gbs(device: str, nbytes: int) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written per second) of a
    ``clone`` of ``nbytes``: the ceiling every row is compared with."""
    src = torch.randn(nbytes // 4, device=device)
    ms = time_ms(lambda: src.clone(), device, repeats=20, warmup=3)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


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
