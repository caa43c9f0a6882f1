"""Prometheus metrics of the service, in the text exposition format (no client library needed)."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RATE_WINDOW_S = 60.0  # images/s gauge: images finished over the last minute


class Histogram:
    def __init__(self, name: str, help_text: str, buckets):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum {self.total:.6f}", f"{self.name}_count {cumulative}"]
        return lines


class Metrics:
    """What the service counts: requests by status, queue depth, batch sizes, queue and compute time, images."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.queue_seconds = Histogram("engine_queue_seconds", "Time from submission to the first stage.",
                                       SECONDS_BUCKETS)
        self.compute_seconds = Histogram("engine_compute_seconds", "Time from the first stage to the result.",
                                         SECONDS_BUCKETS)
        self.batch_images = Histogram("engine_batch_images", "Images per U-Net call.", BATCH_BUCKETS)
        self.images_total = 0
        self._finished: deque[tuple[float, int]] = deque()  # (time, images) within the rate window

    def request(self, status: str) -> None:
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def batch(self, stage: str, images: int, rows: int) -> None:
        with self._lock:
            self.batch_images.observe(images)

    def job_finished(self, job, status: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            if job.admitted is not None:
                self.queue_seconds.observe(job.admitted - job.submitted)
                if status == "ok":
                    self.compute_seconds.observe(now - job.admitted)
            if status == "ok":
                self.images_total += job.images
                self._finished.append((now, job.images))

    def images_per_second(self) -> float:
        now = time.monotonic()
        while self._finished and self._finished[0][0] < now - RATE_WINDOW_S:
            self._finished.popleft()
        return sum(n for _, n in self._finished) / RATE_WINDOW_S

    def render(self, queue_depth: int) -> str:
        with self._lock:
            lines = ["# HELP engine_requests_total Generation requests by outcome.",
                     "# TYPE engine_requests_total counter"]
            lines += [f'engine_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# HELP engine_queue_depth Requests waiting for admission.", "# TYPE engine_queue_depth gauge",
                      f"engine_queue_depth {queue_depth}"]
            for histogram in (self.queue_seconds, self.compute_seconds, self.batch_images):
                lines += histogram.render()
            lines += ["# HELP engine_images_total Images generated.", "# TYPE engine_images_total counter",
                      f"engine_images_total {self.images_total}",
                      f"# HELP engine_images_per_second Images generated per second over the last {RATE_WINDOW_S:g} s.",
                      "# TYPE engine_images_per_second gauge",
                      f"engine_images_per_second {self.images_per_second():.4f}"]
        return "\n".join(lines) + "\n"
