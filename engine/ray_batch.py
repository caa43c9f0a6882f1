"""A batch job on a Ray cluster, through Ray Data: an actor pool of workers (one per GPU, or per CPU slot), each
loading the model once, warming up, and running its share of the rows through its own step-level scheduler
(the fast path where asked), writing images to the job's directory itself.

    python -m engine batch prompts.csv --out DIR --ray [--workers N | --autoscale MIN:MAX] [--num-gpus G]
                                                       [--ray-address ADDR]
    engine.batch("prompts.csv", "DIR", ray=RayOptions(workers=2))

The driver parses the input (the same parser, line numbers, bad-row messages and --strict as a job on one
process), reads what an earlier run left in DIR, gives every seedless row its seed (kept on disk before any
work, so a retried or resumed row makes the same images), groups the rows still to make by the settings that decide their U-Net calls (steps, sampler,
guidance interval, noise level) and cuts the groups into work items of at most max_batch images: a work item
is one Ray Data row and one call of a worker. Workers write each image atomically and return its manifest
entries; the driver appends them to the manifest as they come (fsynced, so a killed driver loses nothing
recorded), shows one progress bar, and when the job ends rewrites the manifest in row order.

Faults: a worker process that dies is restarted by Ray and its work item runs again (its images are rewritten
with the same bytes, under the same names); a killed driver is resumed by running the same command again, and
Ctrl-C stops the driver at once (what the manifest holds is kept, the items in flight are redone by the next
run). A model that cannot load fails the job at once with the worker's own error.

Images: a work item's rows and their batch-mates are fixed by the plan, so the same seeds give the same bytes
whatever the number of workers (at the same torch threads per worker). Where the rows share their settings the
job on one process forms the same batches and gives the same bytes too; with mixed settings its scheduler,
which admits rows in input order, may give a row other batch-mates, and CPU kernels' last bits then differ
(measured: one level of 255 at one pixel in a thousand).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.batch_job import (MANIFEST, PICTURE_FIELDS, ROW_FIELDS, BadRow, BatchSummary, Plan, Row, append,
                              generate_rows, images_of, record, resolved, row_request, sort_manifest)
from engine.errors import EngineError, InvalidRequestError
from engine.loading import load
from engine.serve.scheduler import warm_up

log = logging.getLogger(__name__)

# A row's settings that decide which U-Net calls it makes: rows that share them finish together, so a work item
# of them keeps its scheduler's calls full to the end (prompts, seeds, n and guidance scale do not matter).
# An edit's strength, and whether it has a picture and a mask, are among them.
GROUPING_FIELDS = tuple(name for name in ROW_FIELDS if name not in ("prompt", "negative_prompt", "n", "seed", "guidance"))
# Ray Data's settings for a job: our progress bar counts images across workers (theirs off), and a model that
# cannot load fails the job at its first try (no retries of a constructor that will fail again).
JOB_CONTEXT = {"enable_progress_bars": False, "max_consecutive_actor_init_deaths": 0}


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a batch job runs on Ray. workers: a fixed pool (default: as many as the cluster's
    GPUs, or CPUs, allow at num_gpus / num_cpus each); autoscale: (MIN, MAX) workers instead; address: an
    existing cluster (default: RAY_ADDRESS, else a local cluster started for the job)."""

    workers: int | None = None
    autoscale: tuple[int, int] | None = None
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    address: str | None = None

    def __post_init__(self):
        if self.workers is not None and self.autoscale is not None:
            raise InvalidRequestError("give workers or autoscale, not both")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise InvalidRequestError(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.autoscale is not None:
            if len(self.autoscale) != 2 or not 1 <= self.autoscale[0] <= self.autoscale[1]:
                raise InvalidRequestError(f"autoscale needs (MIN, MAX) with 1 <= MIN <= MAX, got {self.autoscale}")
        if not self.num_gpus >= 0 or not self.num_cpus > 0:
            raise InvalidRequestError(f"num_gpus must be >= 0 and num_cpus > 0, got {self.num_gpus} and "
                                      f"{self.num_cpus}")


def work_items(plan: Plan, defaults: dict | None, max_batch: int) -> list[dict]:
    """The rows still to make as Ray Data rows: grouped by GROUPING_FIELDS (input order within a group), each
    item at most max_batch images (a row of more is an item alone). Every row carries its seed (its own, or
    the plan's: recorded by an earlier run or drawn by batch_job.prepare), so a retried item makes the same
    images."""
    groups: dict[str, list[tuple[Row, int, int]]] = {}  # key -> (row, seed, images)
    for row in plan.todo:
        request = row_request(row, 0, defaults, pictures=False)  # the pictures are read by the worker that runs it
        settings = {**resolved(request), **{name: {**(defaults or {}), **row.fields}.get(name)
                                             for name in ("strength", *PICTURE_FIELDS)}}
        settings["image"], settings["mask"] = settings["image"] is not None, settings["mask"] is not None
        key = json.dumps([settings[name] for name in GROUPING_FIELDS], default=list)
        seed = row.fields.get("seed")
        seed = plan.seeds.get(row.line) if seed is None else seed  # its own, else the plan's (kept on disk)
        groups.setdefault(key, []).append((row, seed, request.batch_size * request.num_images_per_prompt))
    items, current, images = [], [], 0
    for members in groups.values():
        for row, seed, count in members:
            if current and images + count > max_batch:
                items.append(current)
                current, images = [], 0
            current.append([row.line, row.fields, seed, row.folder])
            images += count
        if current:
            items.append(current)
            current, images = [], 0
    return [{"rows": json.dumps(item)} for item in items]


class BatchWorker:
    """One Ray Data actor: the model loaded and warmed up once, then one work item per call."""

    def __init__(self, model: list[str], load_options: dict, max_batch: int, out: str, defaults: dict | None,
                 threads: int):
        torch.set_num_threads(threads)  # its CPU share, whatever the environment says
        self.pipe = load(*model, **load_options)  # an error here ends the job with this error (see run)
        self.warmup_seconds = 0.0
        if any(stage.executor.static for stage in self.pipe.stages):
            self.warmup_seconds = sum(warm_up(self.pipe, max_batch).values())
        self.max_batch, self.out, self.defaults = max_batch, Path(out), defaults
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, item: dict) -> dict:
        """item: {"rows": [a JSON list of [line, fields, seed, folder]]} (one work item); returns one Ray Data
        row per input row: its manifest entries, or why it failed (refused: bad before it ran)."""
        start = time.perf_counter()
        lines = json.loads(item["rows"][0])
        rows = [Row(line, fields, folder) for line, fields, _, folder in lines]
        seeds = {line: seed for line, _, seed, _ in lines}
        results = {"line": [], "entries": [], "error": [], "refused": []}
        for row, request, outcome in generate_rows(self.pipe, rows, self.max_batch, seeds, None, self.defaults):
            failed = isinstance(outcome, Exception)
            results["line"].append(row.line)
            entries = [] if failed else [{**entry, "worker": self.name}  # which process made it: host:pid
                                         for entry in record(self.out, self.pipe, row, request, outcome)]
            results["entries"].append(json.dumps(entries, default=list))
            results["error"].append(str(outcome) if failed else "")
            results["refused"].append(failed and request is None)
        count = len(results["line"])
        results["worker"] = [self.name] * count
        results["busy"] = [time.perf_counter() - start] + [0.0] * (count - 1)  # counted once per call
        results["warmup"] = [self.warmup_seconds] + [0.0] * (count - 1)
        self.warmup_seconds = 0.0  # reported with the first call only
        return results


def run(plan: Plan, out: Path, model: list[str], options: RayOptions, max_batch: int, strict: bool, progress: bool,
        defaults: dict | None, load_options: dict) -> BatchSummary:
    """Run the plan's rows on Ray (see the module's docstring); the summary of what was made."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise EngineError(f"--ray needs Ray Data ({exc.name} is missing): pip install 'cascade-engine[ray]'") from exc
    from tqdm.auto import tqdm

    summary = BatchSummary(out, images_skipped=plan.images_skipped)
    items = work_items(plan, defaults, max_batch)
    if not items:
        return summary
    context = ray.data.DataContext.get_current()
    before = {name: getattr(context, name) for name in JOB_CONTEXT}  # given back after: the caller's context
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=options.address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    try:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's plan and timing lines
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        for name, value in JOB_CONTEXT.items():
            setattr(context, name, value)
        compute = _pool(ray, options, len(items), local=started_here)
        results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            BatchWorker, batch_size=1, batch_format="numpy", compute=compute, num_gpus=options.num_gpus,
            num_cpus=options.num_cpus, fn_constructor_kwargs={
                "model": list(model), "load_options": load_options, "max_batch": max_batch, "out": str(out),
                "defaults": defaults, "threads": max(1, int(options.num_cpus))})
        expected = {row.line: images_of(row, defaults) for row in plan.todo}  # to take a failed row off the bar
        start = time.perf_counter()
        with open(out / MANIFEST, "a", encoding="utf-8") as manifest, \
                tqdm(total=plan.images_todo, unit="image", desc="batch", disable=not progress) as bar:
            try:
                for result in results.iter_rows():
                    _take(result, summary, manifest, bar, strict, expected)
            except KeyboardInterrupt:  # Ctrl-C: what is in the manifest stays; the items in flight are redone
                summary.stopped = True
            except EngineError:
                raise
            except Exception as exc:  # noqa: BLE001: Ray wraps the worker's error; raise the worker's own
                raise _worker_error(exc) from exc
        summary.seconds = time.perf_counter() - start  # from the workers' start: their loading included
    finally:
        for name, value in before.items():
            setattr(context, name, value)
        if started_here:
            ray.shutdown()
    if not summary.stopped:
        sort_manifest(out)
    return summary


def _pool(ray, options: RayOptions, items: int, local: bool):
    """Ray Data's actor pool: fixed, autoscaling, or as wide as the cluster allows (never wider than the work).
    On a local cluster started for the job (no autoscaler to add nodes), a pool the machine cannot hold is an
    EngineError here rather than a job that waits for ever."""
    from ray.data import ActorPoolStrategy

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if options.autoscale is not None:
        low, high = min(options.autoscale[0], items), min(options.autoscale[1], items)
    else:
        low = options.workers
        if low is None:
            low = int(gpus // options.num_gpus) if options.num_gpus else int(cpus // options.num_cpus)
            if low < 1:
                raise EngineError(f"the Ray cluster has {gpus:g} GPU(s) and {cpus:g} CPU(s): not enough for one "
                                  f"worker of {options.num_gpus:g} GPU(s) and {options.num_cpus:g} CPU(s)")
        low = high = min(low, items)
    if local and (low * options.num_gpus > gpus or low * options.num_cpus > cpus):
        raise EngineError(f"{low} worker(s) of {options.num_gpus:g} GPU(s) and {options.num_cpus:g} CPU(s) each do not "
                          f"fit this machine's {gpus:g} GPU(s) and {cpus:g} CPU(s): ask for fewer (--workers, "
                          "--num-gpus, --cpus-per-worker)")
    # One work item at a time per worker: an item waits for a free worker rather than queueing behind a busy
    # one, so the last items spread over the pool (and a worker that dies takes one item with it, not several).
    if low == high:
        return ActorPoolStrategy(size=low, max_tasks_in_flight_per_actor=1)
    return ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=1)


def _take(result: dict, summary: BatchSummary, manifest, bar, strict: bool, expected: dict[int, int]) -> None:
    """One finished input row from a worker: its entries into the manifest, or its failure into the summary."""
    worker = str(result["worker"])
    images, busy = summary.workers.get(worker, (0, 0.0))
    summary.warmup_seconds = max(summary.warmup_seconds, float(result["warmup"]))
    line, error = int(result["line"]), str(result["error"])
    if error:
        if strict:
            raise EngineError(f"line {line}: {error}")
        log.warning("line %d %s: %s", line, "skipped" if result["refused"] else "failed", error)
        (summary.bad_rows if result["refused"] else summary.failed_rows).append(BadRow(line, error))
        bar.total -= expected[line]
        summary.workers[worker] = (images, busy + float(result["busy"]))
        return
    entries = json.loads(str(result["entries"]))
    append(manifest, entries)
    summary.images_written += len(entries)
    summary.workers[worker] = (images + len(entries), busy + float(result["busy"]))
    bar.update(len(entries))


def _worker_error(exc: Exception) -> Exception:
    """The engine's own error behind Ray's wrappers, as an EngineError naming where it happened: found in the
    exception chain (a worker's RayTaskError), or in the text Ray keeps of a traceback (an actor that died in
    its constructor keeps no exception, only its message). Anything else as it came."""
    seen, current = set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EngineError):
            return EngineError(f"a batch worker failed: {type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    found = re.findall(r"^engine\.errors\.(\w+): (.+)$", str(exc), flags=re.MULTILINE)
    if found:
        kind, message = found[-1]
        return EngineError(f"a batch worker failed: {kind}: {message}")
    return exc
