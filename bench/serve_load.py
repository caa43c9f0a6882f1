"""Load test of the HTTP service on loopback: Poisson arrivals, three batching policies side by side.

    python bench/serve_load.py [--model shapes] [--requests 16] [--rate auto] [--overload 1] [--steps 10 10]
                               [--max-batch 4] [--json bench/results/serve_load.json]

For each policy (none: one request at a time; request: batches formed when idle, run to the end; step: our
step-level batching) a fresh `python -m engine serve` runs on 127.0.0.1 in a subprocess, and the same seeded
sequence of requests arrives at the same Poisson rate. `--rate auto` is the rate where "none" saturates: one
over its measured service time (a request alone); `--overload K` offers K times that, a load that "none"
cannot keep up with, so the table shows what each policy can do rather than what arrives. Bounded: --requests requests per policy, --limit seconds.
Reported per policy: p50 / p99 latency (send to response), images/s (images over first send to last response).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command_line, save_json  # noqa: E402

import engine  # noqa: E402
from engine.bench.report import environment  # noqa: E402
from engine.serve.scheduler import POLICIES  # noqa: E402

PROMPTS = ("a large red circle on a blue background", "a small green square on a white background",
           "a large yellow triangle at the top on a black background")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m engine serve` in a subprocess on a free loopback port, ready when entered."""

    def __init__(self, model: str, policy: str, max_batch: int, limit_s: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "engine", "serve", "--model", model, "--port", str(self.port),
                        "--batching", policy, "--max-batch", str(max_batch), "--max-queue", "1000",
                        "--timeout", str(limit_s)]
        self.limit_s = limit_s

    def __enter__(self):
        import httpx

        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {' '.join(self.command)}")
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready in 120 s")

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


def bodies(count: int, steps: list[int]) -> list[dict]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps} for i in range(count)]


def run_load(url: str, requests: list[dict], gaps: list[float], limit_s: float) -> dict:
    """Send `requests` with the given gaps between sends (each in its own thread); latencies and throughput."""
    results: list[tuple[float, int, float]] = []  # (latency, status, completion time)
    lock = threading.Lock()
    start = time.perf_counter()

    http = client(limit_s)

    def worker(body):
        latency, status = send(http, url, body)
        with lock:
            results.append((latency, status, time.perf_counter() - start))

    threads = []
    for body, gap in zip(requests, gaps):
        time.sleep(gap)
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
            "images_per_s": len(ok) / max(r[2] for r in ok) if ok else 0.0}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=engine.DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=16, help="requests per policy")
    parser.add_argument("--rate", default="auto", help="requests per second, or auto: where 'none' saturates")
    parser.add_argument("--overload", type=float, default=1.0,
                        help="offer this many times the rate (with auto: 1 = where 'none' just saturates)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 10], help="steps per stage of each request")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--limit", type=float, default=600.0, help="seconds any one request may take")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    requests = bodies(args.requests, args.steps)
    if args.rate == "auto":  # one over the service time of a request alone, under the "none" policy
        with Server(args.model, "none", args.max_batch, args.limit) as server, client(args.limit) as http:
            send(http, server.url, requests[0])  # warm
            service_s = statistics.median(send(http, server.url, body)[0] for body in requests[:3])
        rate = 1.0 / service_s
    else:
        rate = float(args.rate)
    if args.overload <= 0:
        parser.error(f"--overload must be positive, got {args.overload}")
    rate *= args.overload
    gaps = list(np.random.default_rng(args.seed).exponential(1.0 / rate, size=args.requests))
    gaps[0] = 0.0

    policies = {}
    for policy in POLICIES[::-1]:  # none, request, step
        with Server(args.model, policy, args.max_batch, args.limit) as server:
            policies[policy] = run_load(server.url, requests, gaps, args.limit)
        print(f"{policy:8s} {policies[policy]}", flush=True)

    base = policies["none"]["images_per_s"]
    report = {"benchmark": "serve_load", "command": command_line("serve_load.py", argv),
              **environment(torch.device("cpu")),
              "model": args.model, "requests": args.requests, "rate_per_s": rate, "overload": args.overload, "steps": args.steps,
              "max_batch": args.max_batch, "policies": policies}
    print(f"\n{args.model}, {args.requests} requests at {rate:.2f}/s (Poisson), steps {args.steps}, "
          f"max batch {args.max_batch}\n")
    print("| policy | ok | p50 s | p99 s | images/s | vs none |\n|---|---:|---:|---:|---:|---:|")
    for name, r in policies.items():
        ratio = r["images_per_s"] / base if base else float("nan")
        print(f"| {name} | {r['ok']}/{r['sent']} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['images_per_s']:.3f} "
              f"| {ratio:.2f}x |")
    save_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
