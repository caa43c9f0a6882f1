"""Timing: interleaved calls after warm-up, CUDA events on GPU and perf_counter on CPU; percentiles; peak memory.

Interleaving (a, b, c, a, b, c, ...) makes machine noise (other processes, clock changes, thermal drift) hit
every variant alike, so the ratios between them stay fair even when the absolute times wander.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Callable

import numpy as np
import torch


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds of one call of fn: CUDA events around it on a GPU (after a sync, so earlier work is not
    counted), perf_counter on CPU."""
    if device is not None and torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def interleaved(calls: dict[str, Callable[[], object]], iters: int, warmup: int = 0,
                device: torch.device | str | None = None, pause_s: float = 0.0,
                per_turn: int = 1) -> dict[str, list[float]]:
    """Seconds of every call of each named function: `warmup` untimed calls each, then `iters` rounds in which
    the functions take turns of `per_turn` back-to-back calls (each timed), as a denoising loop calls a U-Net.
    `pause_s` of idle before each turn lets what the previous turn left running (ONNX Runtime's spin-waiting
    threads) stop before the next is timed."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            if pause_s:
                time.sleep(pause_s)
            samples[name] += [timed_call(fn, device) for _ in range(per_turn)]
    return samples


MIN_SAMPLES_P99 = 20  # fewer samples than this and p99 is little more than the slowest call: flagged


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    """n, min, p50 / p90 / p99, mean, the spread (IQR = p75 - p25, and the standard deviation) in
    milliseconds (linear interpolation between samples, as numpy does), and whether p99 rests on at least
    MIN_SAMPLES_P99 samples."""
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    p25, p50, p75, p90, p99 = np.percentile(ms, [25, 50, 75, 90, 99])
    return {"n": int(ms.size), "min_ms": float(ms.min()), "p50_ms": float(p50), "p90_ms": float(p90),
            "p99_ms": float(p99), "mean_ms": float(ms.mean()), "iqr_ms": float(p75 - p25),
            "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0, "p99_reliable": bool(ms.size >= MIN_SAMPLES_P99)}


def peak_memory_kind(device: torch.device) -> str:
    return ("CUDA max_memory_allocated (this variant's call, all resident models included)"
            if device.type == "cuda" else "process peak RSS so far (resource.getrusage; not per variant)")


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory around one call of fn: on a GPU the allocator's peak during the call (tensors only, not
    the CUDA context); on CPU the whole process's peak resident set since it started (it cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
