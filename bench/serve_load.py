"""Load test of the HTTP service on loopback: Poisson arrivals, three batching policies side by side.

    python bench/serve_load.py [--model shapes] [--requests 16 | --seconds S] [--rate auto] [--overload 1 [2 ...]]
                               [--steps 10 10 | --mixed-steps 4 16] [--repeat N] [--max-batch 8]
                               [--json bench/results/serve_load.json]

For each policy (none: one request at a time; request: batches formed when idle, run to the end; step: our
step-level batching) a fresh `python -m engine serve` runs on 127.0.0.1 in a subprocess, and the same seeded
sequence of requests arrives at the same Poisson rate. `--rate auto` is the rate where "none" saturates: one
over its measured service time (a request alone); `--overload K` offers K times that, a load that "none"
cannot keep up with, so the table shows what each policy can do rather than what arrives; several values make a
sweep. `--seconds S` sends as many requests as arrive in S seconds at each load, so that the end of a run (the
last requests draining) weighs as little at every load. The arrivals are a Poisson process conditioned on its
count (the times of `count` uniform draws over count / rate seconds, sorted), so every run offers exactly the
stated load: an unconditioned sequence of 100 arrivals is 10% faster or slower than its rate about a third of
the time, which would move every policy's figures together. `--repeat N` runs each load N times, each with its
own arrival sequence (seeds seed .. seed + N - 1) and the three policies in turn, and reports every repeat and
their medians, and in how many repeats the serving issue's target held. Bounded: that many requests per policy
and load, each at most --limit seconds.
Reported per policy: p50 / p99 latency (send to response); overall images/s (all images over first send to
last response, drain included: it understates a policy that keeps up with its arrivals by about latency /
window, so it errs against the batching policies, and the target check uses it); steady images/s (the rate of
completions over the last three quarters of the arrival window: no drain, but noisy, since completions come a
batch at a time and one batch inside or outside the window moves it by a fifth of "none"'s rate here); and
images per U-Net call (the server's own /metrics). `--table JSON` prints a saved run's tables again.

`--fast-vs-eager` compares the fast path instead of the policies: step batching twice, `serve --no-fast` then
`serve --fast` (the executor's static buffers per row bucket, compiled U-Nets, CUDA graphs on a GPU), at the
same offered load (use `--overload` past what the eager server keeps up with); its target is the fast-path
issue's: at least 1.5x the eager server's overall images/s, with a p99 no worse. The fast server compiles
its row buckets before it reports ready (minutes on a small CPU the first time, cached after): `--ready`
bounds that wait.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


import engine
from engine.bench.report import command_line, environment, save_json, table_cell
from engine.loading import resolve_device
from engine.options import DEFAULT_MAX_BATCH
from engine.serve.defaults import POLICIES
from engine.testing.ports import free_port

PROMPTS = ("a large red circle on a blue background", "a small green square on a white background",
           "a large yellow triangle at the top on a black background")


class Server:
    """`python -m engine serve` in a subprocess on a free loopback port, ready when entered."""

    def __init__(self, model: str, policy: str, max_batch: int, limit_s: float, device: str | None = None,
                 fast: bool | None = None, ready_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "engine", "serve", "--model", model, "--port", str(self.port),
                        "--batching", policy, "--max-batch", str(max_batch), "--max-queue", "1000",
                        "--timeout", str(limit_s)] + ([] if device is None else ["--device", device])
        if fast is not None:
            self.command.append("--fast" if fast else "--no-fast")
        self.limit_s, self.ready_s = limit_s, ready_s

    def __enter__(self):
        import httpx

        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {' '.join(self.command)}")
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become ready in {self.ready_s:g} s")

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(30)


def client(limit_s: float):
    """One HTTP client for all of a run's threads (httpx.Client is thread-safe): a client per request would
    spend this machine's cores, which the server shares, on building connection pools and TLS contexts."""
    import httpx

    return httpx.Client(timeout=limit_s, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))


def send(http, url: str, body: dict) -> tuple[float, int]:
    start = time.perf_counter()
    response = http.post(f"{url}/v1/images/generations", json=body)
    return time.perf_counter() - start, response.status_code


def bodies(count: int, steps: list[int], mixed: list[int] | None = None, seed: int = 0) -> list[dict]:
    """The requests, the same for every policy: `steps` per stage, or with `mixed` (LOW HIGH) each request's
    own step count (for every stage) drawn uniformly from LOW..HIGH, as users who pick their own steps send."""
    if mixed is None:
        return [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps} for i in range(count)]
    draws = np.random.default_rng(seed + 1).integers(mixed[0], mixed[1] + 1, size=count)
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": [int(n)] * len(steps)}
            for i, n in enumerate(draws)]


def arrival_times(count: int, rate: float, seed: int) -> np.ndarray:
    """(count,) seconds from the start, ascending: a Poisson process of `rate` conditioned on `count` arrivals in
    count / rate seconds, which is `count` uniform times over that span. Drawn as the cumulative sums of
    count + 1 exponential gaps scaled to the span (the first count partial sums over the total are exactly
    sorted uniforms)."""
    gaps = np.random.default_rng(seed).exponential(1.0, size=count + 1)
    return np.cumsum(gaps[:count]) * (count / rate) / gaps.sum()


def run_load(url: str, requests: list[dict], arrivals: np.ndarray, limit_s: float) -> dict:
    """Send `requests` at `arrivals` (seconds from the start, each in its own thread); latencies and throughput."""
    results: list[tuple[float, int, float]] = []  # (latency, status, completion time)
    lock = threading.Lock()
    start = time.perf_counter()
    span = float(arrivals[-1])
    window = (span / 4, span)  # the last three quarters of the arrivals, in seconds from the start

    http = client(limit_s)

    def worker(body):
        latency, status = send(http, url, body)
        with lock:
            results.append((latency, status, time.perf_counter() - start))

    threads = []
    for body, at in zip(requests, arrivals):
        time.sleep(max(0.0, at - (time.perf_counter() - start)))  # on schedule, not drifting by the sends' cost
        thread = threading.Thread(target=worker, args=(body,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(limit_s)
    http.close()
    ok = [r for r in results if r[1] == 200]
    latencies = [r[0] for r in ok]
    return {"sent": len(requests), "ok": len(ok), "statuses": sorted({r[1] for r in results}),
            "p50_s": statistics.median(latencies) if latencies else None,
            "p99_s": float(np.percentile(latencies, 99)) if latencies else None,
            "images_per_s": steady_rate([r[2] for r in ok], window),
            "images_per_s_overall": len(ok) / max(r[2] for r in ok) if ok else 0.0}


def steady_rate(completions: list[float], window: tuple[float, float]) -> float:
    """Completions per second inside `window` (seconds from the first send); each request here is one image."""
    low, high = window
    return sum(low <= t < high for t in completions) / (high - low) if high > low else float("nan")


def mean_batch(http, url: str) -> float | None:
    """Images per U-Net call over the run, from the server's /metrics (engine_batch_images sum / count)."""
    values = {}
    for line in http.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("engine_batch_images_sum", "engine_batch_images_count"):
            values[name] = float(value)
    count = values.get("engine_batch_images_count")
    return values["engine_batch_images_sum"] / count if count else None


# What a run compares, name -> (batching policy, --fast): the policies (the default), or the fast path.
POLICY_VARIANTS = {policy: (policy, None) for policy in POLICIES[::-1]}  # none, request, step
FAST_VARIANTS = {"step": ("step", False), "step --fast": ("step", True)}


def run_policy(args, name: str, requests: list[dict], arrivals: np.ndarray) -> dict:
    policy, fast = (FAST_VARIANTS if args.fast_vs_eager else POLICY_VARIANTS)[name]
    with Server(args.model, policy, args.max_batch, args.limit, args.device, fast, args.ready) as server:
        result = run_load(server.url, requests, arrivals, args.limit)
        with client(args.limit) as http:
            result["mean_batch_images"] = mean_batch(http, server.url)
    return result


def target(policies: dict) -> dict:
    """The serving issue's target in one run: step batching serves at least 1.5x the images/s of no batching
    (overall, the figure that errs against batching), with a lower p99 than request batching. For a fast-path
    run, the fast-path issue's: the fast server at least 1.5x the eager one's overall images/s, p99 no worse."""
    if "step --fast" in policies:
        eager, fast = policies["step"], policies["step --fast"]
        ratio = ratio_to_baseline(policies, "step --fast", "images_per_s_overall")
        held = ratio >= 1.5 and None not in (fast["p99_s"], eager["p99_s"]) and fast["p99_s"] <= eager["p99_s"]
        return {"step_vs_none": ratio, "target_held": bool(held)}
    request, step = policies["request"], policies["step"]
    ratio = ratio_to_baseline(policies, "step", "images_per_s_overall")
    held = ratio >= 1.5 and step["p99_s"] is not None and request["p99_s"] is not None \
        and step["p99_s"] < request["p99_s"]
    return {"step_vs_none": ratio, "target_held": bool(held)}


def ratio_to_baseline(policies: dict, policy: str, figure: str) -> float:
    """A figure's ratio to the run's baseline: "none", or in a fast-path run the eager "step"."""
    base = policies["none" if "none" in policies else "step"][figure]
    return policies[policy][figure] / base if base else float("nan")


def summary(repeats: list[dict]) -> dict:
    """A load's repeats in brief: each policy's medians, step's median ratio to none, repeats the target held in."""
    return {"policies": medians([r["policies"] for r in repeats]),
            "step_vs_none": statistics.median(r["step_vs_none"] for r in repeats),
            "target_held": sum(r["target_held"] for r in repeats)}


def medians(runs: list[dict]) -> dict:
    """Per policy, the median of each figure over the repeats (a single run is its own median), and the
    requests sent and answered in all of them."""
    figures = ("p50_s", "p99_s", "images_per_s", "images_per_s_overall", "mean_batch_images")
    out = {}
    for policy in runs[0]:
        out[policy] = {"ok": sum(r[policy]["ok"] for r in runs), "sent": sum(r[policy]["sent"] for r in runs)}
        for name in figures:
            values = [r[policy][name] for r in runs if r[policy][name] is not None]
            out[policy][name] = statistics.median(values) if values else None
    return out


def print_tables(report: dict) -> None:
    """The medians per load and policy, then each repeat's target figures (Markdown, for RESULTS.md)."""
    steps = report["mixed_steps"]
    steps = f"steps {report['steps']}" if steps is None else "steps {}..{} per request".format(*steps)
    print(f"\n{report['model']}, {steps}, max batch {report['max_batch']}; 'none' saturates at "
          f"{report['base_rate_per_s']:.2f} requests/s; medians of {report['repeat']} repeat(s)\n")
    fast = report.get("fast_vs_eager", False)
    base, best, rival = ("step", "step --fast", "step") if fast else ("none", "step", "request")
    print(f"| offered | requests | policy | ok | p50 s | p99 s | overall images/s | vs {base} | steady images/s "
          f"| vs {base} | images per U-Net call |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for load in report["loads"]:
        for name, r in load["policies"].items():
            overall, steady = (statistics.median(ratio_to_baseline(run["policies"], name, figure)
                                                 for run in load["repeats"])
                               for figure in ("images_per_s_overall", "images_per_s"))
            print(f"| {load['overload']:g}x ({load['rate_per_s']:.2f}/s) | {load['requests']} | {name} "
                  f"| {r['ok']}/{r['sent']} | {table_cell(r['p50_s'], '.2f')} | {table_cell(r['p99_s'], '.2f')} "
                  f"| {r['images_per_s_overall']:.3f} | {overall:.2f}x | {r['images_per_s']:.3f} | {steady:.2f}x "
                  f"| {table_cell(r['mean_batch_images'], '.1f')} |")
    # "offered / served": the load against what the baseline served in that very run, since the machine's
    # speed can drift between the rate probe and the run.
    print(f"\n| offered | seed | offered / {base} served | {best} vs {base} | p99 {rival} | p99 {best} | target held |"
          "\n|---:|---:|---:|---:|---:|---:|---|")
    for load in report["loads"]:
        for run in load["repeats"]:
            p = run["policies"]
            served = p[base]["images_per_s_overall"]
            offered = load["rate_per_s"] / served if served else float("nan")
            print(f"| {load['overload']:g}x | {run['seed']} | {offered:.2f}x | {run['step_vs_none']:.2f}x "
                  f"| {table_cell(p[rival]['p99_s'], '.2f')} | {table_cell(p[best]['p99_s'], '.2f')} "
                  f"| {'yes' if run['target_held'] else 'no'} |")
        print(f"| {load['overload']:g}x | all | | {load['step_vs_none']:.2f}x (median) | | "
              f"| {load['target_held']} of {len(load['repeats'])} |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=engine.DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=16, help="requests per policy and load")
    parser.add_argument("--seconds", type=float, default=None,
                        help="instead of --requests: as many requests as arrive in this many seconds at each load")
    parser.add_argument("--rate", default="auto", help="requests per second, or auto: where 'none' saturates")
    parser.add_argument("--overload", type=float, nargs="+", default=[1.0],
                        help="offer this many times the rate, one run per value (with auto: 1 = where 'none' "
                             "just saturates)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 10], help="steps per stage of each request")
    parser.add_argument("--mixed-steps", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="each request's steps (every stage) drawn from LOW..HIGH instead of --steps; the "
                             "auto rate is then measured at the mean, (LOW + HIGH) / 2")
    parser.add_argument("--device", default=None, help="the server's device (default: its own, cuda if available)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="images per U-Net call per stage")
    parser.add_argument("--limit", type=float, default=600.0, help="seconds any one request may take")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each load, each with its own arrivals (seeds seed .. seed + N - 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times (and of --mixed-steps)")
    parser.add_argument("--fast-vs-eager", action="store_true",
                        help="step batching with and without the fast path, instead of the three policies")
    parser.add_argument("--ready", type=float, default=120.0,
                        help="seconds a server may take to load and warm up (compiling, with the fast path)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None, metavar="JSON",
                        help="print the tables of a saved run (its --json) and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        report = json.loads(args.table.read_text())
        if any("repeats" not in load for load in report["loads"]):
            parser.error(f"{args.table} was saved by a version before --repeat; its tables are in bench/RESULTS.md")
        for load in report["loads"]:  # the target as this version judges it
            for run in load["repeats"]:
                run.update(target(run["policies"]))
            load.update(summary(load["repeats"]))
        print_tables(report)
        return report
    if any(k <= 0 for k in args.overload):
        parser.error(f"--overload values must be positive, got {args.overload}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.mixed_steps is not None:
        low, high = args.mixed_steps
        if not 1 <= low <= high:
            parser.error(f"--mixed-steps needs 1 <= LOW <= HIGH, got {low} {high}")
        args.steps = [round((low + high) / 2)] * len(args.steps)  # what the auto rate is measured at

    if args.rate == "auto":  # one over the service time of a request alone, under the "none" policy
        probe = bodies(6, args.steps)  # the median of several: one request alone varies by 10% here
        with Server(args.model, "none", args.max_batch, args.limit, args.device, False, args.ready) as server, \
                client(args.limit) as http:
            send(http, server.url, probe[0])  # warm
            service_s = statistics.median(send(http, server.url, body)[0] for body in probe)
        base_rate = 1.0 / service_s
    else:
        base_rate = float(args.rate)

    loads = []
    frame = {"benchmark": "serve_load", "command": command_line(argv, "serve_load.py"),
             **environment(resolve_device(args.device)), "model": args.model, "base_rate_per_s": base_rate,
             "steps": args.steps, "mixed_steps": args.mixed_steps, "max_batch": args.max_batch,
             "repeat": args.repeat, "fast_vs_eager": args.fast_vs_eager}
    for overload in args.overload:
        rate = base_rate * overload
        count = args.requests if args.seconds is None else max(2, round(rate * args.seconds))
        repeats = []
        for seed in range(args.seed, args.seed + args.repeat):
            requests = bodies(count, args.steps, args.mixed_steps, seed)
            arrivals = arrival_times(count, rate, seed)
            policies = {}
            for policy in (FAST_VARIANTS if args.fast_vs_eager else POLICY_VARIANTS):
                policies[policy] = run_policy(args, policy, requests, arrivals)
                print(f"{overload:g}x seed {seed} {policy:8s} {policies[policy]}", flush=True)
                save_json({**frame, "complete": False, "loads": loads,  # kept if the run stops before its end
                           "running": {"overload": overload, "seed": seed, "policies": policies}}, args.json)
            repeats.append({"seed": seed, "policies": policies, **target(policies)})
        loads.append({"overload": overload, "rate_per_s": rate, "requests": count, "repeats": repeats,
                      **summary(repeats)})

    report = {**frame, "complete": True, "loads": loads}
    print_tables(report)
    save_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
