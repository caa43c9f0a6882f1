"""A discrete-event model of the serving scheduler's policies, for what-ifs the load test cannot run quickly.

    python bench/serve_model.py [--costs cpu|gpu] [--overload 1.5 2] [--requests 100] [--mixed-steps 4 16]

A two-stage cascade on one device: a U-Net call over b images costs a + c * b seconds per stage (cpu: the
packaged `shapes` model's calls measured on a 2-core AMD EPYC; gpu: an assumed flat cost, for contrast),
plus a fixed cost per request (prompt encoding, PNG, HTTP). Requests arrive at the load test's Poisson times
(serve_load.arrival_times); the policies admit as engine/serve/scheduler.py does. `step-all` calls every busy
stage at each step (the scheduler's rule before it called only the fullest stage). Reported per cell: means
over --runs arrival sequences, and in what share of them a step policy's p99 is below request batching's (one
load-test run is one such sequence). A model, not a measurement: bench/serve_load.py measures.
"""

from __future__ import annotations

import argparse

import numpy as np


from serve_load import arrival_times

COSTS = {  # (a, c) per stage in seconds, and the fixed cost per request
    # cpu: a straight line through the packaged model's U-Net calls at 1, 2, 4 and 8 images (stage I guided, so
    # two rows an image; stage II unguided), 5 calls each, 2-core AMD EPYC, 2026-12-01; per request: prompt
    # encoding 5 ms, PNG 4 ms, HTTP and the rest about 6 ms.
    "cpu": ([(0.0184, 0.0144), (0.0298, 0.0287)], 0.015),
    "gpu": ([(0.010, 0.0008), (0.015, 0.0015)], 0.01),
}
POLICIES = ("request", "step-all", "step")


def simulate(policy: str, rate: float, steps: np.ndarray, costs, per_request: float, max_batch: int = 8,
             seed: int = 0) -> tuple[float, float, float]:
    """(images/s, p50 s, p99 s) of one run of len(steps) requests, steps[i] per stage for request i."""
    count = len(steps)
    arrivals = arrival_times(count, rate, seed)
    now, next_arrival = 0.0, 0
    queue, between, stages = [], [], [[], []]  # waiting; done with stage I; running batches
    left, finished = {}, {}
    while len(finished) < count:
        while next_arrival < count and arrivals[next_arrival] <= now:
            queue.append(next_arrival)
            next_arrival += 1
        if not (queue or between or stages[0] or stages[1]):
            now = arrivals[next_arrival]
            continue
        while between and len(stages[1]) < max_batch:
            job = between.pop(0)
            stages[1].append(job)
            left[job] = steps[job]
        if policy != "request" or not (between or stages[0] or stages[1]):
            while queue and len(stages[0]) < max_batch:
                job = queue.pop(0)
                stages[0].append(job)
                left[job] = steps[job]
                now += per_request / 2  # encoding the prompt, on the scheduler's thread
        if policy == "step-all":
            called = [i for i in (0, 1) if stages[i]]
        else:  # the fullest stage, the later one on a tie
            called = [max((0, 1), key=lambda i: (len(stages[i]), i))]
        for index in called:
            a, c = costs[index]
            now += a + c * len(stages[index])
            for job in list(stages[index]):
                left[job] -= 1
                if left[job] == 0:
                    stages[index].remove(job)
                    if index == 0:
                        between.append(job)
                    else:
                        finished[job] = now + per_request / 2  # PNG and HTTP
    latency = np.array([finished[j] - arrivals[j] for j in range(count)])
    return count / max(finished.values()), float(np.percentile(latency, 50)), float(np.percentile(latency, 99))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", choices=sorted(COSTS), default="cpu")
    parser.add_argument("--overload", type=float, nargs="+", default=[1.5, 2.0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mixed-steps", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"))
    parser.add_argument("--runs", type=int, default=24, help="arrival sequences per cell")
    args = parser.parse_args(argv)
    costs, per_request = COSTS[args.costs]
    alone = args.steps * sum(a + c for a, c in costs) + per_request  # "none" saturates at 1 / this
    print("| offered | policy | images/s vs none | p50 s | p99 s | p99 below request's |\n"
          "|---:|---|---:|---:|---:|---:|")
    for overload in args.overload:
        runs = {}
        for policy in POLICIES:
            runs[policy] = []
            for seed in range(args.runs):
                rng = np.random.default_rng(seed + 1)
                steps = (np.full(args.requests, args.steps) if args.mixed_steps is None
                         else rng.integers(args.mixed_steps[0], args.mixed_steps[1] + 1, args.requests))
                runs[policy].append(simulate(policy, overload / alone, steps, costs, per_request, seed=seed))
            runs[policy] = np.array(runs[policy])  # (runs, 3): images/s, p50, p99
        for policy, figures in runs.items():
            throughput, p50, p99 = figures.mean(axis=0)
            below = "" if policy == "request" else f"{np.mean(figures[:, 2] < runs['request'][:, 2]):.0%}"
            print(f"| {overload:g}x | {policy} | {throughput * alone:.2f}x | {p50:.2f} | {p99:.2f} | {below} |")


if __name__ == "__main__":
    main()
