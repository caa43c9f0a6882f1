"""The floor under a benchmark: a component's FLOPs over the machine's matmul peak, measured in the same run.

FLOPs of the real-size models come from the shared reference (engine/configs/real_size.json,
"flops_and_params": per forward at batch 1, counted with torch.utils.flop_counter); anything else (the packaged
tiny models) is counted once here with FlopCounterMode. "% of roofline" = floor time / measured time: 100% would
mean every FLOP ran at the speed of one large matmul, which convolutions, norms and attention never quite reach.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from engine.bench.timing import interleaved

# Square matmul sizes for the peak: big enough to saturate the device, small enough to take well under a second.
PEAK_MATMUL_N = {"cuda": 8192, "cpu": 1024}
PEAK_ITERS = {"cuda": 20, "cpu": 5}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                       iters: int | None = None) -> float:
    """Measured TFLOP/s of an (n x n) @ (n x n) matmul in `dtype` (median of `iters` timed calls after 3 warm-up
    calls): fp16/bf16 tensor cores on a GPU, the BLAS (fp32 unless asked otherwise) on CPU."""

    n = n or PEAK_MATMUL_N[device.type]
    iters = iters or PEAK_ITERS[device.type]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = statistics.median(interleaved({"mm": lambda: torch.mm(a, b)}, iters, warmup=3, device=device)["mm"])
    return 2 * n**3 / seconds / 1e12


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn (2 per multiply-add), with attention counted through SDPA's math path: the
    fused CPU kernel is invisible to FlopCounterMode, its matmul decomposition is not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def floor_seconds(flops: int | None, peak_tflops: float | None) -> float | None:
    if not flops or not peak_tflops:
        return None
    return flops / (peak_tflops * 1e12)
