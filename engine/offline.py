"""Offline batch jobs (MLPerf's "Offline" scenario): every row known up front, run through the step-level
batching scheduler so rows with different settings still share U-Net calls, written to a directory that a
second run resumes; on one process, or on a Ray cluster's workers (engine.ray_batch).

    python -m engine batch prompts.csv --out DIR [--max-batch 8] [--preset fast] [--strict] [--sheet PNG]
    python -m engine batch prompts.csv --out DIR --ray [--workers N | --autoscale MIN:MAX] [--num-gpus G]
    engine.batch("prompts.jsonl", "DIR")                        # the same from Python; returns a BatchSummary
    engine.batch("prompts.jsonl", "DIR", ray=RayOptions(workers=2))
    for result in engine.batch_job.generate_rows(pipe, rows):   # or a generator of (row, request, outcome)

The input formats, the output directory and how a second run resumes: engine.batch_job. Ctrl-C stops at the
next step boundary (on Ray: the driver stops taking results); what finished is written, nothing is
half-written.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from engine import ray_batch
from engine.batch_job import (MANIFEST, BadRow, BatchSummary, Plan, append, checked_rows, generate_rows, images_of,
                              job_lock, prepare, record, row_request, stop_on_signals, write_sheet)
from engine.errors import EngineError, InvalidRequestError
from engine.loading import load
from engine.model_dir import DEFAULT_MODEL
from engine.options import DEFAULT_MAX_BATCH
from engine.pipeline import Pipeline
from engine.ray_batch import RayOptions
from engine.serve.scheduler import warm_up

log = logging.getLogger(__name__)


def batch(source, out, model: Pipeline | str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
          strict: bool = False, progress: bool = True, sheet=None, defaults: dict | None = None,
          ray: RayOptions | bool | None = None, **load_options) -> BatchSummary:
    """Run the rows of `source` (a .txt/.csv/.jsonl path, or an iterable of prompts or field dicts) into `out`;
    resumable (see engine.batch_job). model: a Pipeline, or what engine.load takes (default: the packaged
    model), with load_options (backend=, device=, dtype=, fast=; with the fast path the row buckets the job's
    U-Net calls run at are compiled, and on CUDA captured, first: serve.scheduler.warm_up). strict: stop at the
    first bad row (InvalidRequestError) instead of skipping it. sheet: a PNG path for a captioned contact sheet
    of every image made. ray: RayOptions (or True for their defaults) to run on a Ray cluster's workers, each
    loading `model` itself (a path or hub id, not a Pipeline)."""
    out = Path(out)
    rows, bad = checked_rows(source, strict, defaults)
    # The memory plan (engine/plan.py) checks the job's calls fit: max_batch images each.
    load_options = {"images_per_call": max_batch, **{k: v for k, v in load_options.items() if v is not None}}
    with job_lock(out):  # one job per output folder: a second is refused before it loads anything
        if ray is not None and ray is not False:
            if isinstance(model, Pipeline):
                raise InvalidRequestError("a batch job on Ray loads the model on each worker: pass its path(s) or "
                                          "hub id as model=, not a loaded Pipeline")
            options = RayOptions() if ray is True else ray
            if not isinstance(options, RayOptions):
                raise InvalidRequestError(f"ray= takes RayOptions(...) or True, got {type(ray).__name__}")
            plan = prepare(out, rows, defaults)
            summary = ray_batch.run(plan, out, _model_paths(model), options, max_batch, strict, progress, defaults,
                                    load_options)
        else:
            pipe = model if isinstance(model, Pipeline) else load(*_model_paths(model), **load_options)
            plan = prepare(out, rows, defaults)
            summary = _run_here(pipe, plan, out, max_batch, strict, progress, defaults)
        summary.bad_rows[:0] = bad
        if sheet is not None and not summary.stopped:
            write_sheet(out, rows, sheet)
    return summary


def _caching(pipe: Pipeline, plan: Plan, defaults: dict | None) -> list:
    """The per-stage settings of the rows that cache features (what the warm-up makes them), each once."""
    found = {}
    for row in plan.todo:
        try:
            settings = pipe.settings(row_request(row, 0, defaults, pictures=False))
        except EngineError:  # a bad row: reported when it runs
            continue
        if any(s.cache is not None for s in settings):
            found[tuple(s.cache for s in settings)] = settings
    return list(found.values())


def _model_paths(model) -> list:
    return [DEFAULT_MODEL] if model is None else [model] if isinstance(model, (str, Path)) else list(model)


def _run_here(pipe: Pipeline, plan: Plan, out: Path, max_batch: int, strict: bool, progress: bool,
              defaults: dict | None) -> BatchSummary:
    """The plan's rows on this process, through one scheduler; the manifest grows as rows finish."""
    summary = BatchSummary(out, images_skipped=plan.images_skipped)
    if plan.todo and any(stage.executor.static for stage in pipe.stages):
        summary.warmup_seconds = sum(warm_up(pipe, max_batch, caching=_caching(pipe, plan, defaults)).values())
    stop = threading.Event()
    start = time.perf_counter()
    with stop_on_signals(stop), open(out / MANIFEST, "a", encoding="utf-8") as manifest, \
            tqdm(total=plan.images_todo, unit="image", desc="batch", disable=not progress) as bar:
        for row, request, outcome in generate_rows(pipe, plan.todo, max_batch, plan.seeds, stop, defaults):
            if isinstance(outcome, Exception):  # refused by the model (a bad row), or failed while running
                if strict:
                    raise EngineError(f"line {row.line}: {outcome}") from outcome
                log.warning("line %d %s: %s", row.line, "skipped" if request is None else "failed", outcome)
                (summary.bad_rows if request is None else summary.failed_rows).append(BadRow(row.line, str(outcome)))
                bar.total -= images_of(row, defaults)
                continue
            entries = record(out, pipe, row, request, outcome)
            append(manifest, entries)
            summary.images_written += len(entries)
            bar.update(len(entries))
    summary.stopped = stop.is_set()
    summary.seconds = time.perf_counter() - start
    return summary
