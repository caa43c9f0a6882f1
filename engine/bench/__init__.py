"""Benchmarks built into the engine: `python -m engine bench` and `engine.bench.run(BenchOptions(...))`.

    timing.py      interleaved timing (CUDA events / perf_counter), percentiles, peak memory
    roofline.py    measured matmul peak, FLOP counting, the floor time
    real_size.py   the real IF-I-XL / IF-II-L / x4 upscaler / T5-XXL architectures with random weights
    components.py  inputs and the eager / compile / ours variants of one component
    runner.py      what is timed for a cascade or a real-size model, and the report
    report.py      device and versions, the table, JSON
"""

from engine.bench.runner import BenchOptions, run

__all__ = ["BenchOptions", "run"]
