"""Prometheus metrics of the service, through prometheus_client: one registry per service (so that several apps
in one process do not share counts), with the process's own metrics and the build's.

    engine_requests_total{status}   every answer to a generation request: ok, invalid (parse errors and 400s),
                                    unauthorized, rejected (queue full), timeout, cancelled, failed, shutdown
    engine_queue_depth              requests waiting for admission
    engine_queue_seconds, engine_compute_seconds, engine_batch_images   histograms
    engine_images_total, engine_images_per_second (over the last RATE_WINDOW_S)
    engine_build_info{version, torch}, process_*                         what runs, and its memory and CPU
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from engine.version import __version__

SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RATE_WINDOW_S = 60.0  # images/s gauge: images finished over the last minute


class Metrics:
    """What the service counts; `render()` gives the Prometheus text exposition."""

    def __init__(self):
        import prometheus_client as prom  # optional: the [serve] extra

        self._lock = threading.Lock()
        self.registry = prom.CollectorRegistry()
        self.queue_depth = 0
        self._requests = prom.Counter("engine_requests", "Generation requests by outcome.", ["status"],
                                      registry=self.registry)
        prom.Gauge("engine_queue_depth", "Requests waiting for admission.",
                   registry=self.registry).set_function(lambda: self.queue_depth)
        self.queue_seconds = prom.Histogram("engine_queue_seconds", "Time from submission to the first stage.",
                                            buckets=SECONDS_BUCKETS, registry=self.registry)
        self.compute_seconds = prom.Histogram("engine_compute_seconds", "Time from the first stage to the result.",
                                              buckets=SECONDS_BUCKETS, registry=self.registry)
        self.batch_images = prom.Histogram("engine_batch_images", "Images per U-Net call.", buckets=BATCH_BUCKETS,
                                           registry=self.registry)
        self._images = prom.Counter("engine_images", "Images generated.", registry=self.registry)
        prom.Gauge("engine_images_per_second", f"Images generated per second over the last {RATE_WINDOW_S:g} s.",
                   registry=self.registry).set_function(self.images_per_second)
        prom.Gauge("engine_build_info", "The engine and torch versions that serve.", ["version", "torch"],
                   registry=self.registry).labels(__version__, torch.__version__).set(1)
        prom.ProcessCollector(registry=self.registry)
        self._finished: deque[tuple[float, int]] = deque()  # (time, images) within the rate window
        self._render = lambda: prom.generate_latest(self.registry).decode()
        # Further recorders with request/batch/job_finished (Ray Serve's metrics, on a replica).
        self.sinks: list = []

    def request(self, status: str) -> None:
        self._requests.labels(status).inc()
        for sink in self.sinks:
            sink.request(status)

    def batch(self, stage: str, images: int, rows: int) -> None:
        self.batch_images.observe(images)
        for sink in self.sinks:
            sink.batch(stage, images, rows)

    def job_finished(self, job, status: str) -> None:
        now = time.monotonic()
        for sink in self.sinks:
            sink.job_finished(job, status)
        self._requests.labels(status).inc()
        if job.admitted is not None:
            self.queue_seconds.observe(job.admitted - job.submitted)
            if status == "ok":
                self.compute_seconds.observe(now - job.admitted)
        if status == "ok":
            self._images.inc(job.images)
            with self._lock:
                self._finished.append((now, job.images))

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._finished and self._finished[0][0] < now - RATE_WINDOW_S:
                self._finished.popleft()
            return sum(n for _, n in self._finished) / RATE_WINDOW_S

    def render(self, queue_depth: int) -> str:
        self.queue_depth = queue_depth
        return self._render()
