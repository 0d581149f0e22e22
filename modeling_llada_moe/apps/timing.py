"""Timing for the benchmarks and `llada-moe bench`: the median of several calls after a warm-up."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, device: torch.device, repeats: int):
    """Median seconds of `fn()` over `repeats` calls after one warm-up call (CUDA-synchronised around each), and
    the last call's result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result
