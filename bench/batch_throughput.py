"""Offline throughput: `engine.batch` (the step-level scheduler) against a loop of `generate()` calls, on the same
rows with mixed step counts, interleaved in one run, on the packaged model.

    python bench/batch_throughput.py [--rows 64] [--rounds 2] [--max-batch 8] [--json bench/results/batch_throughput.json]

Each round times the loop, then the batch job (into a fresh directory, PNG writing and hashing included), so
both see the same machine state; the figures are images per second, with the ratio per round.

    python bench/batch_throughput.py --fast-vs-eager [--rows 64] [--rounds 2] [--json ...]

compares the batch job with and without the fast path instead (what `python -m engine batch --fast` runs
against `batch`), interleaved per round. The fast job's warm-up (its row buckets compiled, minutes on a small
CPU the first time, then loaded from the cache) is reported apart; its images/s, like the job's own summary,
count from after it.

    python bench/batch_throughput.py --ray [--rows 64] [--rounds 2] [--json ...]

times whole jobs on a local Ray cluster (started once, as a user's cluster would already be up) against the job
on one process, interleaved per round, each with the model given by name so every variant loads its own: one
process (torch's default threads), Ray with 1 worker of 1 CPU, 1 worker of all CPUs, and one worker per CPU.
Images per second count the whole job (a Ray worker's start, loading and the driver's planning included), with
each worker's own rate while busy beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine.demo.evaluate import held_out_scenes  # noqa: E402
from engine.demo.shapes import caption  # noqa: E402
from engine.batch_job import Row, row_request  # noqa: E402
from engine.bench.report import save_json  # noqa: E402

# Mixed per-row settings: (stage I steps, stage II steps), cycled over the rows.
STEP_MIX = [["smart27", 15], [20, 10], [10, 6], [27, 15]]


def rows(count: int, steps: list | None = None) -> list[dict]:
    """`count` held-out captions, each with its seed and steps (STEP_MIX in turn, or every row `steps`)."""
    return [{"prompt": caption(scene), "seed": k, "steps": steps or STEP_MIX[k % len(STEP_MIX)]}
            for k, scene in enumerate(held_out_scenes(count))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="with --fast-vs-eager: cpu or cuda")
    parser.add_argument("--fast-vs-eager", action="store_true",
                        help="engine.batch with the fast path against without it, instead of against a loop")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="every row's steps per stage (default: STEP_MIX in turn); the campaign's rehearsal: few")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--ray", action="store_true",
                        help="jobs on a local Ray cluster (1 and several workers) against the job on one process")
    args = parser.parse_args()
    if args.fast_vs_eager:
        return fast_vs_eager(args)
    if args.ray:
        return on_ray(args)

    pipe = engine.load(engine.DEFAULT_MODEL, device="cpu")
    work = rows(args.rows, args.steps)
    requests = [row_request(Row(k + 1, fields)) for k, fields in enumerate(work)]
    pipe.run(requests[0])  # warm-up
    loop_rates, batch_rates = [], []
    for round_ in range(args.rounds):
        start = time.perf_counter()
        for request in requests:
            pipe.run(request)
        loop_rates.append(len(requests) / (time.perf_counter() - start))
        out = Path(tempfile.mkdtemp(prefix="batch-bench-"))
        try:
            summary = engine.batch(work, out, model=pipe, max_batch=args.max_batch, progress=False)
            batch_rates.append(summary.images_written / summary.seconds)
        finally:
            shutil.rmtree(out)
        print(f"round {round_ + 1}: loop {loop_rates[-1]:.2f} images/s, batch {batch_rates[-1]:.2f} images/s, "
              f"{batch_rates[-1] / loop_rates[-1]:.2f}x", file=sys.stderr)
    ratios = [b / loop for b, loop in zip(batch_rates, loop_rates)]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "engine": engine.__version__,
              "command": " ".join(sys.argv), "rows": args.rows, "max_batch": args.max_batch, "step_mix": [args.steps] if args.steps else STEP_MIX,
              "loop_images_per_s": loop_rates, "batch_images_per_s": batch_rates, "ratios": ratios,
              "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    print(f"| loop of generate() | {np.median(loop_rates):.2f} images/s ({min(loop_rates):.2f}-{max(loop_rates):.2f}) |")
    print(f"| engine.batch, max_batch {args.max_batch} | {np.median(batch_rates):.2f} images/s "
          f"({min(batch_rates):.2f}-{max(batch_rates):.2f}) |")
    print(f"| ratio | {report['ratio_median']:.2f}x ({report['ratio_min']:.2f}-{report['ratio_max']:.2f}) |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def timed_batch(pipe, work, max_batch: int):
    """One engine.batch job into a fresh directory: (images/s after its warm-up, warm-up seconds)."""
    out = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    try:
        summary = engine.batch(work, out, model=pipe, max_batch=max_batch, progress=False)
        return summary.images_written / summary.seconds, summary.warmup_seconds
    finally:
        shutil.rmtree(out)


def fast_vs_eager(args) -> None:
    eager = engine.load(engine.DEFAULT_MODEL, device=args.device, fast=False)
    fast = engine.load(engine.DEFAULT_MODEL, device=args.device, fast=True)
    work = rows(args.rows, args.steps)
    eager.run(row_request(Row(1, work[0])))  # warm-up
    rates = {"eager": [], "fast": []}
    warmups = []
    for round_ in range(args.rounds):
        rate, _ = timed_batch(eager, work, args.max_batch)
        rates["eager"].append(rate)
        rate, warm = timed_batch(fast, work, args.max_batch)
        rates["fast"].append(rate)
        warmups.append(warm)
        print(f"round {round_ + 1}: batch {rates['eager'][-1]:.2f} images/s, batch --fast {rate:.2f} images/s "
              f"(warm-up {warm:.1f} s), {rate / rates['eager'][-1]:.2f}x", file=sys.stderr)
        save_json({"benchmark": "batch_fast_vs_eager", "complete": False, "rounds_done": round_ + 1,
                   "eager_images_per_s": rates["eager"], "fast_images_per_s": rates["fast"],
                   "fast_warmup_s": warmups}, args.json)  # kept if the run stops before its end
    ratios = [f / e for f, e in zip(rates["fast"], rates["eager"])]
    report = {"benchmark": "batch_fast_vs_eager", "date": time.strftime("%Y-%m-%d"),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "engine": engine.__version__, "command": " ".join(sys.argv),
              "rows": args.rows, "max_batch": args.max_batch, "step_mix": [args.steps] if args.steps else STEP_MIX,
              "eager_images_per_s": rates["eager"], "fast_images_per_s": rates["fast"], "fast_warmup_s": warmups,
              "ratios": ratios, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
              "ratio_max": max(ratios)}
    for name, label in (("eager", "batch"), ("fast", "batch --fast")):
        values = rates[name]
        print(f"| engine.batch ({label}), max_batch {args.max_batch} | {np.median(values):.2f} images/s "
              f"({min(values):.2f}-{max(values):.2f}) |")
    print(f"| ratio | {report['ratio_median']:.2f}x ({report['ratio_min']:.2f}-{report['ratio_max']:.2f}) |")
    print(f"| fast warm-up | {', '.join(f'{w:.1f} s' for w in warmups)} (the first compiles, later ones load) |")
    save_json({**report, "complete": True}, args.json)


def on_ray(args) -> None:
    import os

    import ray

    from engine.ray_batch import RayOptions

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    variants = {"one process": None, "ray, 1 worker x 1 CPU": RayOptions(workers=1, num_cpus=1),
                f"ray, 1 worker x {cpus} CPUs": RayOptions(workers=1, num_cpus=cpus),
                f"ray, {cpus} workers x 1 CPU": RayOptions(workers=cpus, num_cpus=1)}
    work = rows(args.rows, args.steps)
    rates = {name: [] for name in variants}
    busy = {name: [] for name in variants}  # per worker, images/s while busy
    for round_ in range(args.rounds):
        for name, options in variants.items():
            out = Path(tempfile.mkdtemp(prefix="batch-bench-"))
            try:
                start = time.perf_counter()
                summary = engine.batch(work, out, model=engine.DEFAULT_MODEL, device="cpu", max_batch=args.max_batch,
                                       progress=False, ray=options)
                rates[name].append(summary.images_written / (time.perf_counter() - start))
                busy[name].append([images / seconds for images, seconds in summary.workers.values()])
            finally:
                shutil.rmtree(out)
            print(f"round {round_ + 1}: {name}: {rates[name][-1]:.2f} images/s (workers busy: "
                  f"{', '.join(f'{r:.2f}' for r in busy[name][-1]) or '-'})", file=sys.stderr)
    ray.shutdown()
    base = rates["one process"]
    report = {"benchmark": "batch_on_ray", "date": time.strftime("%Y-%m-%d"),
              "machine": platform.processor() or platform.machine(), "cpus": cpus, "torch": torch.__version__,
              "ray": ray.__version__, "engine": engine.__version__, "command": " ".join(sys.argv), "rows": args.rows,
              "max_batch": args.max_batch, "step_mix": STEP_MIX, "images_per_s": rates,
              "worker_busy_images_per_s": busy,
              "ratio_to_one_process": {name: [r / b for r, b in zip(values, base)] for name, values in rates.items()}}
    print("| job | images/s, whole job (min-max) | vs one process | each worker while busy |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        ratios = report["ratio_to_one_process"][name]
        workers = [r for per_round in busy[name] for r in per_round]
        print(f"| {name} | {np.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) | "
              f"{np.median(ratios):.2f}x | {f'{np.median(workers):.2f}' if workers else '-'} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
