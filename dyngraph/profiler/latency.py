"""Latency of a call: warm, repeated, median and IQR; CUDA events on a GPU."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch.utils import benchmark


def measure(
    fn: Callable[[], object], device: torch.device, threads: int = 1, min_run_time: float = 0.2
) -> tuple[float, float]:
    """(median, IQR) in seconds of `fn()`, after two warm-up calls.

    CPU: `torch.utils.benchmark.Timer` with `threads` threads. CUDA: CUDA events around each
    call (the host does not wait between calls, only once per measurement).
    """
    fn()
    fn()
    if device.type == "cuda":
        times = []
        total = 0.0
        while total < min_run_time or len(times) < 10:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
            times.append(t)
            total += t
        q = statistics.quantiles(times, n=4)
        return statistics.median(times), q[2] - q[0]
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time
    )
    return m.median, m.iqr
