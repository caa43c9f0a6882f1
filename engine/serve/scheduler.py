"""Step-level batching: requests join a stage's running batch at the next U-Net call and leave when done.

A diffusion request is many U-Net calls long. Instead of running each request (or a fixed batch of them) to
the end, the scheduler keeps one running batch per stage: every scheduler step makes one U-Net call over all
the requests in one stage's batch (the fullest stage's), each row at its own timestep. A new request is
admitted at the next step boundary if the first stage has room (`max_batch` images); a request that finishes
a stage moves on to the next stage's batch (or completes) without waiting for the others.

Each request draws its randomness from its own generator (seeded by its seed) when it enters a stage, so its
images are those `Pipeline.run` gives for it, whatever it shares a batch with. Cancellation and deadlines are
checked at every step boundary; the waiting queue is bounded (`QueueFullError` when full); a request for
more images than `max_batch` is refused at submit; a request whose stage produces NaN fails alone.

    scheduler = BatchingScheduler(pipe, max_batch=8, max_queue=32)
    scheduler.start()                                   # a background thread runs step() in a loop
    future = scheduler.submit(GenerateRequest("a red circle", seed=1), timeout_s=30)
    images = future.result().images                     # concurrent.futures.Future[Generation]
    future.cancel()                                     # works until it completes: dropped at the next step
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from engine.errors import EngineError, InvalidRequestError, QueueFullError, RequestTimeoutError, ShuttingDownError
from engine.options import DEFAULT_MAX_BATCH, GenerateRequest
from engine.serve.defaults import DEFAULT_MAX_QUEUE, DEFAULT_POLICY, POLICIES
from engine.pipeline import CascadeRun, Pipeline
from engine.stage import StageRun

log = logging.getLogger(__name__)



@dataclass
class Job:
    """One submitted request: its walk through the cascade (pipeline.CascadeRun) and its place in the queue."""

    id: int
    walk: CascadeRun
    images: int  # prompts x images per prompt
    future: Future
    deadline: float | None  # time.monotonic() past which it is dropped
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None  # when it entered the first stage
    run: StageRun | None = None  # its run of its current stage (walk.stage), once admitted there

    @property
    def request(self) -> GenerateRequest:
        return self.walk.request

    @property
    def stage(self) -> int:
        """Index of the stage it is in or waits for."""
        return self.walk.index


class BatchingScheduler:
    def __init__(self, pipeline: Pipeline, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
                 policy: str = DEFAULT_POLICY):
        if max_batch < 1 or max_queue < 1:
            raise InvalidRequestError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        if policy not in POLICIES:
            raise InvalidRequestError(f"unknown batching policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.pipeline = pipeline
        self.policy = policy
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()  # submitted, not yet in stage 0
        self._jobs: list[Job] = []  # admitted and not finished, in admission order
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.on_batch = None  # optional callback(stage_name, images, rows) after each U-Net call (metrics)
        self.on_finish = None  # optional callback(job, status) when a job leaves ("ok", "failed", ...)

    # -- the caller's side ------------------------------------------------------------------------------

    def submit(self, request: GenerateRequest, timeout_s: float | None = None) -> Future:
        """Queue a request; its Future gives a Generation. Bad requests and a full queue raise here, at once."""
        walk = CascadeRun(self.pipeline, request)  # validated before it takes a queue slot
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidRequestError(f"timeout_s must be > 0, got {timeout_s}")
        images = request.batch_size * request.num_images_per_prompt
        if images > self.max_batch:  # it would make one call of its own size, holding every other request up
            raise InvalidRequestError(
                f"the request asks for {images} images (prompts x images per prompt), more than one U-Net call "
                f"here takes (max_batch {self.max_batch}); send at most {self.max_batch} per request, or raise "
                "max_batch (python -m engine serve --max-batch)")
        future: Future = Future()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job = Job(next(self._ids), walk, images, future, deadline)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); try again shortly")
            self._waiting.append(job)
            self._wake.notify()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def active(self, stage: int) -> list[int]:
        """Ids of the jobs in a stage's running batch."""
        return [job.id for job in self._jobs if job.stage == stage and job.run is not None]

    def start(self) -> None:
        """Run step() in a background thread until stop()."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        with self.pipeline.run_context():  # a backend's setup (ORT on CPU: torch on one thread) for the loop's life
            while True:
                with self._lock:
                    while not self._stopping and not self._waiting and not self._jobs:
                        self._wake.wait()
                    if self._stopping:
                        return
                try:
                    self.step()
                except Exception as exc:  # a bug or an out-of-memory: fail what was running, keep serving
                    log.exception("scheduler step failed")
                    self.fail_running(exc)

    # -- one scheduler step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Drop cancelled and expired jobs, admit what fits, make one U-Net call (per input shape) in the
        stage with the most images. Returns whether there was anything to do."""
        self._drop_finished_or_expired()
        for index in reversed(range(len(self.pipeline.stages))):  # later stages first: they free their slots
            self._admit(index)
        running = [[j for j in self._jobs if j.stage == index and j.run is not None]
                   for index in range(len(self.pipeline.stages))]
        # One stage per step: the one with the most images in its batch, the later stage on a tie. The stages
        # share one device, so calling every busy stage at every step makes each request wait for the other
        # stages' calls too; calling the fullest one makes fewer, larger calls. (bench/serve_model.py models
        # a lower p50 and p99 than calling every stage; measured on 2 CPU cores, the p99s are within noise.)
        index = max(range(len(running)), key=lambda i: (sum(j.images for j in running[i]), i))
        if not running[index]:
            return False
        for group in _by_input_shape(running[index]):
            self._call(self.pipeline.stages[index], group)
        return True

    @property
    def running(self) -> bool:
        """The loop's thread is alive (it stops only at stop(), or when the scheduler itself breaks)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def idle(self) -> bool:
        """Nothing waiting, nothing running."""
        with self._lock:
            return not self._waiting and not self._jobs

    def fail_all(self, exc: Exception) -> None:
        """Fail every job, waiting or running, with `exc` (a shutdown whose drain time ran out)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            self._fail(job, exc)
        self.fail_running(exc)

    def fail_running(self, exc: Exception) -> None:
        """Fail every admitted job with `exc` (a fault of the scheduler itself); the waiting ones stay queued."""
        for job in list(self._jobs):
            self._fail(job, exc)

    def _drop_finished_or_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            kept = deque()
            for job in self._waiting:
                if not self._dropped(job, now):
                    kept.append(job)
            self._waiting = kept
        self._jobs = [job for job in self._jobs if not self._dropped(job, now)]

    def _dropped(self, job: Job, now: float) -> bool:
        """Whether the job leaves now (cancelled, or past its deadline: then its Future says so)."""
        if job.future.cancelled():
            self._finish(job, "cancelled")
            return True
        if job.deadline is not None and now > job.deadline:
            _settle(job.future, exception=RequestTimeoutError(
                f"request {job.id} ran past its {job.deadline - job.submitted:.3g} s deadline "
                f"(at {self.pipeline.stages[min(job.stage, len(self.pipeline.stages) - 1)].name})"))
            self._finish(job, "timeout")
            return True
        return False

    def _admit(self, index: int) -> None:
        """Start runs in stage `index` while it has room (max_batch images): the jobs that finished the stage
        before it, or for the first stage, new requests from the queue in order."""
        used = sum(j.images for j in self._jobs if j.stage == index and j.run is not None)
        if index > 0:
            ready = [j for j in self._jobs if j.stage == index and j.run is None]
        elif self.policy != "step" and self._jobs:
            return  # "request" and "none": new requests wait until the cascade is idle
        else:
            ready = self._take_waiting(used, limit=1 if self.policy == "none" else None)
        for job in ready:
            if used + job.images > self.max_batch:
                return  # it waits for the next step boundary
            try:
                if index == 0:
                    job.walk.begin()  # encodes the prompt once per text encoder, seeds the generator
                job.run = job.walk.start_stage()
            except Exception as exc:  # whatever it is, it is this job's alone
                self._fail(job, exc)
                continue
            used += job.images

    def _take_waiting(self, used: int, limit: int | None) -> list[Job]:
        """Move queued requests that fit next to `used` images into the admitted jobs, in order."""
        taken: list[Job] = []
        with self._lock:
            while self._waiting and (limit is None or len(taken) < limit):
                job = self._waiting[0]
                if job.future.cancelled():
                    self._waiting.popleft()
                    self._finish(job, "cancelled")
                    continue
                if used + job.images > self.max_batch:  # submit refused any job larger than max_batch
                    break
                self._waiting.popleft()
                used += job.images
                taken.append(job)
        for job in taken:
            job.admitted = time.monotonic()
            self._jobs.append(job)
        return taken

    def _call(self, stage, jobs: list[Job]) -> None:
        """One U-Net call over the runs of `jobs` in `stage`, through the stage's executor (engine/executor.py:
        static buffers and graph replay where the U-Nets are static), each run given its rows back.

        A failing call is made again for each job alone, so that what fails (one request's rows, or a batch too
        large for the memory left) fails that job only; a job whose own call or sampler step fails leaves alone."""
        start = time.perf_counter()
        try:
            outputs = stage.executor.forward([job.run for job in jobs])
        except Exception as exc:
            if len(jobs) == 1:
                self._fail(jobs[0], exc)
                return
            log.warning("a U-Net call over %d requests failed (%s: %s); calling each alone", len(jobs),
                        type(exc).__name__, exc)
            for job in jobs:
                self._call(stage, [job])
            return
        seconds = time.perf_counter() - start
        if self.on_batch is not None:
            self.on_batch(stage.name, sum(j.images for j in jobs), sum(len(out) for out in outputs))
        for job, out in zip(jobs, outputs):
            job.walk.timings[stage.name] = job.walk.timings.get(stage.name, 0.0) + seconds
            try:
                job.run.advance(out)
            except Exception as exc:  # its guidance or sampler step: its own
                self._fail(job, exc)
                continue
            if job.run.done:
                self._next_stage(job)

    def _next_stage(self, job: Job) -> None:
        try:
            job.walk.finish_stage(job.run)  # NumericalError (or a decoder's failure) for this job alone
        except Exception as exc:
            self._fail(job, exc)
            return
        job.run = None
        if job.walk.done:
            self._jobs.remove(job)
            _settle(job.future, result=job.walk.result())
            self._finish(job, "ok")

    def _fail(self, job: Job, exc: Exception) -> None:
        """Fail one job; an exception that is not the engine's own is named as an EngineError for its caller."""
        if not isinstance(exc, EngineError):
            log.error("request %d failed: %s: %s", job.id, type(exc).__name__, exc)
            exc = EngineError(f"request {job.id} failed in the scheduler: {type(exc).__name__}: {exc}")
        if job in self._jobs:
            self._jobs.remove(job)
        _settle(job.future, exception=exc)
        self._finish(job, "shutdown" if isinstance(exc, ShuttingDownError) else "failed")

    def _finish(self, job: Job, status: str) -> None:
        if self.on_finish is not None:
            self.on_finish(job, status)


def warm_up(pipeline: Pipeline, max_batch: int, caching=None) -> dict[str, float]:
    """The one warm-up of a deployment (a service start, a Ray replica, `engine.batch`), before it takes work:
    one short generation (the text encoders and each stage once), and where the U-Nets are static (the fast
    path) the executor's buffers of every row bucket the scheduler can call, 1 .. 2 x max_batch rows (each
    image twice under guidance), for each step kind feature caching in `caching` runs (Pipeline.warmup; None:
    the presets'): compiled, and on CUDA captured. Returns seconds per part."""
    return pipeline.warmup(images=(1,), scheduler_rows=range(1, 2 * max_batch + 1), caching=caching, steps=1)


def _settle(future: Future, result=None, exception: Exception | None = None) -> None:
    """Give the Future its outcome, unless the caller cancelled it meanwhile (futures stay pending while they
    run, so that Future.cancel() works at any step boundary)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # cancelled by the caller after the last check


def _by_input_shape(jobs: list[Job]) -> list[list[Job]]:
    """Runs that can share a U-Net call: same sample shape (an x4 stage's latents take their input's size)."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.run.x.shape[1:]), []).append(job)
    return list(groups.values())
