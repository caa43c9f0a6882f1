"""Offline batch jobs (MLPerf's "Offline" scenario): every row known up front, run through the step-level
batching scheduler so rows with different settings still share U-Net calls, written to a directory that a
second run resumes.

    python -m engine batch prompts.csv --out DIR [--max-batch 8] [--preset fast] [--strict] [--sheet PNG]
    engine.batch("prompts.jsonl", "DIR")                      # the same from Python; returns a BatchSummary
    for result in engine.offline.generate_rows(pipe, rows):   # or a generator of (row, Generation | error)

Input: a .txt file (one prompt a line), a .csv file (a `prompt` column, plus any request field as a column) or a
.jsonl file (one request a line, with the HTTP API's fields: prompt, n, seed, steps, guidance, noise_level,
negative_prompt, scheduler, guidance_interval, preset). In Python, rows may also be an iterable of strings or
dicts of those fields.

Output: DIR/images/<row>-<k>.png (row: the input's line number; k: the image of that row), each written under
DIR/.partial/ and renamed into images/, so no partial file is ever visible there; DIR/manifest.jsonl, one line per image: the
input row, the resolved request (its seed drawn when the row has none), the file, its SHA-256, the timings, the
model and its backend. A second run on the same DIR skips the rows whose images the manifest records with
matching hashes (and whose input row is unchanged), and redoes the others with the seeds recorded for them.
Ctrl-C stops at the next step boundary; what finished is written, nothing is half-written.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm.auto import tqdm

from engine.errors import EngineError, InvalidRequestError
from engine.images import contact_sheet
from engine.loading import load
from engine.model_dir import DEFAULT_MODEL
from engine.options import API_FIELDS, API_REQUEST_FIELDS, DEFAULT_MAX_BATCH, GenerateRequest, request_from_api
from engine.pipeline import Generation, Pipeline
from engine.serve.scheduler import BatchingScheduler, warm_up
from engine.version import __version__

log = logging.getLogger(__name__)

FORMATS = (".txt", ".csv", ".jsonl")
MANIFEST = "manifest.jsonl"
IMAGES = "images"
PARTIAL = ".partial"  # where images are written before their rename into images/


@dataclass(frozen=True)
class Row:
    """One input row: its line number in the input (1-based) and its request fields, as the API names them."""

    line: int
    fields: dict


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass
class BatchSummary:
    """What a batch run did."""

    out: Path
    images_written: int = 0
    images_skipped: int = 0  # already there from an earlier run, hashes matching
    bad_rows: list[BadRow] = field(default_factory=list)  # unparsable or refused, with their line numbers
    failed_rows: list[BadRow] = field(default_factory=list)  # refused by the model while running
    stopped: bool = False  # by Ctrl-C (SIGINT) or SIGTERM, at a step boundary
    seconds: float = 0.0  # generating and writing, after the warm-up
    warmup_seconds: float = 0.0  # compiling (and on CUDA capturing) the fast path's row buckets, before

    def __str__(self) -> str:
        rate = self.images_written / self.seconds if self.seconds else 0.0
        parts = [f"{self.images_written} image(s) written to {self.out / IMAGES} ({rate:.2f} images/s)",
                 f"{self.images_skipped} already there"]
        if self.bad_rows:
            parts.append(f"{len(self.bad_rows)} bad row(s) skipped")
        if self.failed_rows:
            parts.append(f"{len(self.failed_rows)} row(s) failed")
        if self.warmup_seconds:
            parts.append(f"warm-up {self.warmup_seconds:.1f} s")
        text = ", ".join(parts)
        return text + ("; stopped: run the same command again to finish" if self.stopped else "")


def read_rows(source) -> Iterator[Row | BadRow]:
    """The rows of a .txt/.csv/.jsonl file, or of an iterable of strings or field dicts; BadRow where a line
    cannot be read as a request."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix not in FORMATS:
            raise InvalidRequestError(f"batch input must be one of {', '.join(FORMATS)}, got {str(path)!r}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EngineError(f"cannot read batch input {str(path)!r}: {exc}") from exc
        yield from {".txt": _text_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows}[path.suffix](text)
        return
    for line, item in enumerate(source, 1):
        if isinstance(item, str):
            yield Row(line, {"prompt": item})
        elif isinstance(item, dict):
            yield _checked_fields(line, dict(item))
        else:
            yield BadRow(line, f"a row must be a prompt or a dict of request fields, got {type(item).__name__}")


def _text_rows(text: str) -> Iterator[Row]:
    for line, prompt in enumerate(text.splitlines(), 1):
        if prompt.strip():
            yield Row(line, {"prompt": prompt.strip()})


def _csv_rows(text: str) -> Iterator[Row | BadRow]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        raise InvalidRequestError(f"a batch .csv needs a 'prompt' column; its header is {reader.fieldnames}")
    for record in reader:
        line = reader.line_num
        if None in record:  # more cells than the header has columns
            yield BadRow(line, f"{len(record) - 1 + len(record[None])} cells under {len(record) - 1} columns")
            continue
        fields = {}
        for name, cell in record.items():
            if cell is None or cell.strip() == "":
                continue
            fields[name] = cell if name in ("prompt", "negative_prompt", "scheduler", "preset") else _cell(cell)
        yield _checked_fields(line, fields)


def _cell(text: str):
    """A CSV cell as JSON where it parses as JSON (27, 7.5, [27, 15], "smart27"), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _jsonl_rows(text: str) -> Iterator[Row | BadRow]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            fields = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            yield BadRow(line, f"not valid JSON: {exc}")
            continue
        if not isinstance(fields, dict):
            yield BadRow(line, f"a line must be a JSON object of request fields, got {type(fields).__name__}")
            continue
        yield _checked_fields(line, fields)


def _checked_fields(line: int, fields: dict) -> Row | BadRow:
    unknown = sorted(set(fields) - set(API_REQUEST_FIELDS))
    if unknown:
        return BadRow(line, f"unknown field(s) {', '.join(unknown)}; a row takes {', '.join(API_REQUEST_FIELDS)}")
    if "prompt" not in fields:
        return BadRow(line, "no prompt")
    return Row(line, fields)


def generate_rows(pipe: Pipeline, rows: Iterable[Row], max_batch: int = DEFAULT_MAX_BATCH, seeds=None,
                  stop: threading.Event | None = None, defaults: dict | None = None):
    """(row, request, Generation or the exception that failed it) for each row, as each finishes: all through
    one step-level scheduler, so rows share U-Net calls. seeds: line -> seed, for rows without their own (a
    resumed run's). defaults: fields for rows that lack them (e.g. {"preset": "fast"}). stop: set it to end at
    the next step boundary (the rows in flight are dropped)."""
    scheduler = BatchingScheduler(pipe, max_batch=max_batch, max_queue=max_batch * 2)
    pending: deque = deque(rows)
    running: dict = {}  # Future -> (row, request)
    while pending or running:
        if stop is not None and stop.is_set():
            for future in running:
                future.cancel()
            return
        while pending and scheduler.queue_depth < max_batch:  # enough waiting to fill the next batch
            row = pending.popleft()
            try:
                request = row_request(row, (seeds or {}).get(row.line), defaults)
                running[scheduler.submit(request)] = (row, request)
            except InvalidRequestError as exc:
                yield row, None, exc
        scheduler.step()
        for future in [f for f in running if f.done()]:
            row, request = running.pop(future)
            yield row, request, future.exception() or future.result()


def row_request(row: Row, seed: int | None = None, defaults: dict | None = None) -> GenerateRequest:
    """The row's request (`seed` where the row names none; else a fresh one is drawn), as numpy images."""
    fields = {**(defaults or {}), **row.fields}
    if fields.get("seed") is None and seed is not None:
        fields["seed"] = seed
    return request_from_api({**fields, "output_type": "pil"})


def batch(source, out, model: Pipeline | str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
          strict: bool = False, progress: bool = True, sheet=None, defaults: dict | None = None,
          **load_options) -> BatchSummary:
    """Run the rows of `source` (a .txt/.csv/.jsonl path, or an iterable of prompts or field dicts) into `out`;
    resumable (see the module's docstring). model: a Pipeline, or what engine.load takes (default: the packaged
    model), with load_options (backend=, device=, dtype=, fast=; with the fast path the row buckets the job's
    U-Net calls run at are compiled, and on CUDA captured, first: serve.scheduler.warm_up). strict: stop at the first bad row (InvalidRequestError)
    instead of skipping it. sheet: a PNG path for a captioned contact sheet of every image made."""
    out = Path(out)
    rows, bad = [], []
    for row in read_rows(source):
        if isinstance(row, Row):
            try:  # its values checked before the model loads (the model's own limits are checked at submit)
                row_request(row, 0, defaults)
                rows.append(row)
                continue
            except InvalidRequestError as exc:
                row = BadRow(row.line, str(exc))
        if strict:
            raise InvalidRequestError(f"line {row.line}: {row.reason}")
        log.warning("line %d skipped: %s", row.line, row.reason)
        bad.append(row)
    if isinstance(model, Pipeline):
        pipe = model
    else:
        paths = [DEFAULT_MODEL] if model is None else [model] if isinstance(model, (str, Path)) else list(model)
        pipe = load(*paths, **{k: v for k, v in load_options.items() if v is not None})
    for sub in (IMAGES, PARTIAL):
        (out / sub).mkdir(parents=True, exist_ok=True)
    summary = BatchSummary(out, bad_rows=bad)
    done, seeds = _resume(out, rows)
    todo = [row for row in rows if row.line not in done]
    summary.images_skipped = sum(len(done[row.line]) for row in rows if row.line in done)
    total = sum(_images_of(row, defaults) for row in todo)
    if todo and any(stage.executor.static for stage in pipe.stages):
        summary.warmup_seconds = sum(warm_up(pipe, max_batch).values())
    stop = threading.Event()
    start = time.perf_counter()
    identity = {"model": pipe.source, "backend": pipe.backend, "device": str(pipe.device),
                "dtype": str(pipe.dtype).removeprefix("torch."), "engine": __version__}
    with _stop_on_signals(stop), open(out / MANIFEST, "a", encoding="utf-8") as manifest, \
            tqdm(total=total, unit="image", desc="batch", disable=not progress) as bar:
        for row, request, outcome in generate_rows(pipe, todo, max_batch, seeds, stop, defaults):
            if isinstance(outcome, Exception):  # refused by the model (a bad row), or failed while running
                if strict:
                    raise EngineError(f"line {row.line}: {outcome}") from outcome
                log.warning("line %d %s: %s", row.line, "skipped" if request is None else "failed", outcome)
                (summary.bad_rows if request is None else summary.failed_rows).append(BadRow(row.line, str(outcome)))
                bar.total -= _images_of(row, defaults)
                continue
            stages = {stage.name: dataclasses.asdict(settings)  # every stage's settings as they ran
                      for stage, settings in zip(pipe.stages, pipe.settings(request))}
            for k, image in enumerate(outcome.images):
                entry = _write_image(out, row, k, image)
                manifest.write(json.dumps({**entry, "input": row.fields, "request": _resolved(request),
                                           "stages": stages, "timings": outcome.timings, **identity},
                                          default=list) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())  # an image counts as made once its manifest line is on disk
            summary.images_written += len(outcome.images)
            bar.update(len(outcome.images))
    summary.stopped = stop.is_set()
    summary.seconds = time.perf_counter() - start
    if sheet is not None and not summary.stopped:
        _sheet(out, rows, sheet)
    return summary


def _images_of(row: Row, defaults) -> int:
    request = row_request(row, 0, defaults)
    return request.batch_size * request.num_images_per_prompt


def _resolved(request: GenerateRequest) -> dict:
    """The request as it ran, in the API's names (tuples become JSON lists): what draws it again."""
    return {name: getattr(request, API_FIELDS.get(name, name)) for name in API_REQUEST_FIELDS}


def _write_image(out: Path, row: Row, k: int, image) -> dict:
    """Write one PNG atomically (a hidden temporary name, then a rename); its manifest fields."""
    name = f"{row.line}-{k}.png"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    temporary = out / PARTIAL / name  # beside images/, on its file system: no partial file is ever under images/
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, out / IMAGES / name)
    return {"row": row.line, "image": k, "file": f"{IMAGES}/{name}", "sha256": hashlib.sha256(data).hexdigest()}


def _resume(out: Path, rows: list[Row]) -> tuple[dict[int, list[dict]], dict[int, int]]:
    """From an earlier run's manifest: the rows whose every image is there with its hash (line -> entries), and
    the seeds recorded for the others. The manifest is rewritten with the kept entries only (one line per image,
    whatever is redone), and stray partial files go."""
    path = out / MANIFEST
    for stray in (out / PARTIAL).glob("*"):
        stray.unlink()
    if not path.exists():
        return {}, {}
    by_line: dict[int, list[dict]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(raw)
            by_line.setdefault(int(entry["row"]), []).append(entry)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash: its image is redone
    current = {row.line: row for row in rows}
    done, seeds = {}, {}
    for line, entries in by_line.items():
        row = current.get(line)
        if row is None or entries[-1].get("input") != row.fields:
            continue  # the input changed: the row is made afresh
        if row.fields.get("seed") is None and entries[-1].get("request", {}).get("seed") is not None:
            seeds[line] = entries[-1]["request"]["seed"]
        wanted = entries[-1]["request"].get("n", 1) * _prompts(row)
        latest = {e["image"]: e for e in entries}
        if len(latest) == wanted and all(_intact(out, e) for e in latest.values()):
            done[line] = [latest[k] for k in sorted(latest)]
    kept = [json.dumps(e) for line in sorted(done) for e in done[line]]
    temporary = path.with_name(f".{MANIFEST}.partial")
    temporary.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(temporary, path)
    return done, seeds


def _prompts(row: Row) -> int:
    prompt = row.fields.get("prompt")
    return len(prompt) if isinstance(prompt, list) else 1


def _intact(out: Path, entry: dict) -> bool:
    file = out / entry["file"]
    return file.is_file() and hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]


class _stop_on_signals:
    """Ctrl-C (and SIGTERM) set `stop`, so the run ends at the next step boundary; a second Ctrl-C ends it at
    once. Only in the main thread, where Python lets signals be handled."""

    def __init__(self, stop: threading.Event):
        self.stop, self.previous = stop, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig, frame):
        if self.stop.is_set():
            raise KeyboardInterrupt
        log.warning("stopping at the next step boundary (again to stop at once)")
        self.stop.set()

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _sheet(out: Path, rows: list[Row], path) -> None:
    """A contact sheet of every image in the manifest, captioned with its prompt."""
    from PIL import Image

    entries = [json.loads(line) for line in (out / MANIFEST).read_text(encoding="utf-8").splitlines()]
    order = {row.line: i for i, row in enumerate(rows)}
    entries.sort(key=lambda e: (order.get(e["row"], len(order)), e["image"]))
    pictures = [Image.open(out / e["file"]).convert("RGB") for e in entries]
    captions = [str(e["request"]["prompt"]) for e in entries]
    contact_sheet(pictures, captions).save(path)
