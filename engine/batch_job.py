"""A batch job's rows and its output directory, shared by the job on one process (engine.offline) and on a Ray
cluster (engine.ray_batch): reading rows, running them through one step-level scheduler, writing images and
the manifest, and reading what an earlier run left.

Input: a .txt file (one prompt a line), a .csv file (a `prompt` column, plus any request field as a column) or a
.jsonl file (one request a line, with the HTTP API's fields: prompt, n, seed, steps, guidance, noise_level,
negative_prompt, scheduler, guidance_interval, preset, strength). In Python, rows may also be an iterable of
strings or dicts of those fields. Edits: a row's `image` (and for inpainting `mask`) is a picture file's path,
relative to the input file's folder (for an iterable, the current folder) and inside it: a path that leads out
of it, by `..`, an absolute path or a link, is a bad row. A picture is read only if it is a regular file (not a
FIFO, device or socket), reached from / one folder at a time without following any link (so no folder swapped
for a link mid-read can redirect it), at most MAX_PICTURE_PIXELS by its header before it is decoded; any failure
to read or decode it, whatever the cause, makes its row a bad row with its line number.

Output: DIR/images/<row>-<k>.png (row: the input's line number; k: the image of that row), each written under
DIR/.partial/ and renamed into images/, so no partial file is ever visible there; DIR/manifest.jsonl, one line
per image: the input row, the resolved request (its seed drawn when the row has none), the file, its SHA-256,
the timings, the model and its backend; DIR/seeds.jsonl, the seed of every seedless row, on disk before the row
runs. A second run on the same DIR skips the rows whose images the manifest records with matching hashes (and
whose input row is unchanged), and redoes the others with the seeds recorded for them. A manifest line of the
wrong shape (hand-edited), or naming a file other than its own images/ROW-K.png, is ignored with a warning. A job
holds DIR/.lock (flock) while it runs: a second job on the same DIR is refused until the first ends.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import signal
import stat
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from engine.errors import EngineError, InvalidRequestError
from engine.images import contact_sheet
from engine.options import (API_FIELDS, API_REQUEST_FIELDS, DEFAULT_MAX_BATCH, GenerateRequest, fresh_seed,
                            request_from_api)
from engine.pipeline import Generation, Pipeline
from engine.serve.scheduler import BatchingScheduler
from engine.version import __version__

log = logging.getLogger(__name__)

FORMATS = (".txt", ".csv", ".jsonl")
MANIFEST = "manifest.jsonl"
SEEDS = "seeds.jsonl"  # the seed of every seedless row, on disk before the row runs
IMAGES = "images"
PARTIAL = ".partial"  # where images are written before their rename into images/
LOCK = ".lock"  # flock'ed by the job running on DIR
# A row's picture, by its header, before it is decoded. Declared twice: the edits route's bound
# (engine/serve/edits.py MAX_PICTURE_PIXELS), kept here so a batch job does not import the server.
MAX_PICTURE_PIXELS = 4096 * 4096


# A row's picture files (paths inside its folder) -> the request fields they fill.
PICTURE_FIELDS = {"image": "image", "mask": "mask_image"}
ROW_FIELDS = (*API_REQUEST_FIELDS, *PICTURE_FIELDS)


@dataclass(frozen=True)
class Row:
    """One input row: its line number in the input (1-based), its request fields as the API names them (and
    PICTURE_FIELDS), and the folder its picture paths are inside (None: the current folder)."""

    line: int
    fields: dict
    folder: str | None = None


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
    workers: dict[str, tuple[int, float]] = field(default_factory=dict)  # Ray: worker -> (images, busy seconds)

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
        text = ", ".join(parts) + ("; stopped: run the same command again to finish" if self.stopped else "")
        text += f"\n  manifest: {self.out / MANIFEST}"
        for worker, (images, busy) in sorted(self.workers.items()):
            text += f"\n  worker {worker}: {images} image(s), {images / busy if busy else 0.0:.2f} images/s while busy"
        return text


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
        folder = str(path.resolve().parent)
        for row in {".txt": _text_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows}[path.suffix](text):
            yield dataclasses.replace(row, folder=folder) if isinstance(row, Row) else row
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
            text_cell = name in ("prompt", "negative_prompt", "scheduler", "preset", *PICTURE_FIELDS)
            fields[name] = cell if text_cell else _cell(cell)
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
    unknown = sorted(set(fields) - set(ROW_FIELDS))
    if unknown:
        return BadRow(line, f"unknown field(s) {', '.join(unknown)}; a row takes {', '.join(ROW_FIELDS)}")
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


def row_request(row: Row, seed: int | None = None, defaults: dict | None = None,
                pictures: bool = True) -> GenerateRequest:
    """The row's request (`seed` where the row names none; else a fresh one is drawn), as PIL images, with its
    picture files read (InvalidRequestError for one outside its folder or unreadable); pictures=False leaves an
    edit's fields out, for what depends on the prompts and n alone."""
    fields = {**(defaults or {}), **row.fields}
    if fields.get("seed") is None and seed is not None:
        fields["seed"] = seed
    if not pictures:
        fields = {name: value for name, value in fields.items() if name not in (*PICTURE_FIELDS, "strength")}
    read = {target: row_picture(row, name, fields[name]) for name, target in PICTURE_FIELDS.items()
            if fields.get(name) is not None}
    return request_from_api({**fields, "output_type": "pil"}, **read)


def row_picture(row: Row, name: str, path):
    """The picture file a row names in field `name`, read as diffusers' edit pipelines take it (RGB, a mask grey);
    InvalidRequestError for a path that is not a string, leads out of the row's folder, or cannot be read or
    decoded for any reason (module docstring)."""
    from PIL import Image

    if not isinstance(path, str) or not path:
        raise InvalidRequestError(f"{name} must be a picture file's path, got {path!r}")
    folder = Path(row.folder or ".").resolve()
    try:
        descriptor = open_inside(folder, path)
    except Outside as exc:
        raise InvalidRequestError(f"{name} {path!r} is outside the input's folder {str(folder)!r} ({exc}): a row "
                                  "names picture files inside it, not links") from None
    except Exception as exc:  # noqa: BLE001: a NUL, a missing file, a FIFO...: the row's, never the job's
        raise InvalidRequestError(f"cannot read {name} {path!r}: {type(exc).__name__}: {exc}") from None
    try:
        with os.fdopen(descriptor, "rb") as file, Image.open(file) as picture:  # the header only, so far
            width, height = picture.size
            if width * height > MAX_PICTURE_PIXELS:
                raise InvalidRequestError(f"{name} {path!r} is {width}x{height}: over the {MAX_PICTURE_PIXELS} pixels "
                                          "a batch row's picture may have (4096x4096); scale it down")
            return picture.convert("L" if name == "mask" else "RGB")
    except InvalidRequestError:
        raise
    except Exception as exc:  # noqa: BLE001: a LAB mask, a decompression bomb, a truncated file...
        raise InvalidRequestError(f"cannot read {name} {path!r}: {type(exc).__name__}: {exc}") from None


class Outside(ValueError):
    """A path that leads out of the folder it must stay in: by .., as an absolute path, or through a link."""


_NO_FOLLOW = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def open_inside(folder: Path, relative: str) -> int:
    """A descriptor of the regular file at `relative` under `folder` (an absolute path without links, as
    Path.resolve gives), opened from / one component at a time with O_NOFOLLOW, each folder through the one
    above it: a component that is a link (a folder swapped for one mid-read included) fails instead of being
    followed, so nothing outside `folder` is ever opened. O_NONBLOCK: a FIFO does not hang the open; what is not
    a regular file (FIFO, device, socket, folder) is refused after it by fstat. Outside for a path that leads
    out; OSError or ValueError (a NUL) for the rest."""
    if os.path.isabs(relative):
        raise Outside("an absolute path")
    parts = os.path.normpath(relative).split(os.sep)  # "a/./b" -> a, b; no link is followed, so this is exact
    if parts[0] == os.pardir:
        raise Outside("it leads out by '..'")
    current = os.open("/", _NO_FOLLOW | os.O_DIRECTORY)
    try:
        for part in [*folder.parts[1:], *parts[:-1]]:
            try:
                inner = os.open(part, _NO_FOLLOW | os.O_DIRECTORY, dir_fd=current)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and \
                        stat.S_ISLNK(os.stat(part, dir_fd=current, follow_symlinks=False).st_mode):
                    raise Outside(f"{part!r} is a link") from None  # O_NOFOLLOW | O_DIRECTORY's answer to one
                raise
            os.close(current)
            current = inner
        try:
            descriptor = os.open(parts[-1], _NO_FOLLOW | os.O_NONBLOCK, dir_fd=current)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Outside(f"{parts[-1]!r} is a link") from None
            raise
    finally:
        os.close(current)
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise OSError(f"not a regular file (a FIFO, device, socket or folder: mode {stat.filemode(mode)})")
    return descriptor


def checked_rows(source, strict: bool, defaults: dict | None) -> tuple[list[Row], list[BadRow]]:
    """The input's rows whose values make a request (checked before any model loads; the model's own limits are
    checked at submit), and the bad ones by line. strict: the first bad row raises InvalidRequestError."""
    rows, bad = [], []
    for row in read_rows(source):
        if isinstance(row, Row):
            try:
                row_request(row, 0, defaults)
                rows.append(row)
                continue
            except InvalidRequestError as exc:
                row = BadRow(row.line, str(exc))
        if strict:
            raise InvalidRequestError(f"line {row.line}: {row.reason}")
        log.warning("line %d skipped: %s", row.line, row.reason)
        bad.append(row)
    return rows, bad


@dataclass
class Plan:
    """What a run on `out` has to do: the rows still to make (an earlier run's finished rows are kept), and the
    seeds an earlier run recorded for seedless rows."""

    rows: list[Row]  # every good row of the input
    todo: list[Row]
    seeds: dict[int, int]  # line -> seed
    images_skipped: int
    images_todo: int


def prepare(out: Path, rows: list[Row], defaults: dict | None) -> Plan:
    """Make out/'s folders, read what an earlier run left there (see _resume), and give every seedless row still
    to make its seed: the one recorded for it, or one drawn now and on disk (SEEDS) before any work, so a run
    killed at any point leaves each row the seed it will keep."""
    for sub in (IMAGES, PARTIAL):
        (out / sub).mkdir(parents=True, exist_ok=True)
    done, seeds = _resume(out, rows)
    todo = [row for row in rows if row.line not in done]
    drawn = {row.line: fresh_seed() for row in todo
             if {**(defaults or {}), **row.fields}.get("seed") is None and row.line not in seeds}
    _keep_seeds(out, {row.line: row for row in rows}, drawn)
    return Plan(rows, todo, {**seeds, **drawn}, images_skipped=sum(len(entries) for entries in done.values()),
                images_todo=sum(images_of(row, defaults) for row in todo))


@contextlib.contextmanager
def job_lock(out: Path):
    """Hold out/.lock (an exclusive flock) for the job: EngineError at once if another job holds it. The lock
    goes with the process, so a killed job leaves none behind."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise EngineError(f"cannot open the batch job's lock {path}: {exc}") from exc
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EngineError(f"another batch job holds the output folder {out} (its lock {path}): wait for it to "
                              "finish, or give this job another --out") from None
        yield
    finally:
        os.close(descriptor)  # releases the lock


def identity(pipe: Pipeline) -> dict:
    """What made an image, as each manifest line records it."""
    return {"model": pipe.source, "backend": pipe.backend, "device": str(pipe.device),
            "dtype": str(pipe.dtype).removeprefix("torch."), "engine": __version__}


def record(out: Path, pipe: Pipeline, row: Row, request: GenerateRequest, generation: Generation) -> list[dict]:
    """Write a finished row's images (each atomically); their manifest entries, one per image."""
    stages = {stage.name: dataclasses.asdict(settings)  # every stage's settings as they ran
              for stage, settings in zip(pipe.stages, pipe.settings(request))}
    made_by, settings = identity(pipe), resolved(request)
    return [{**_write_image(out, row, k, image, settings), "input": row.fields, "request": settings,
             "stages": stages, "timings": generation.timings, **made_by}
            for k, image in enumerate(generation.images)]


def append(manifest, entries: list[dict]) -> None:
    """Add entries to the open manifest, on disk before this returns: an image counts as made once its line is."""
    for entry in entries:
        manifest.write(json.dumps(entry, default=list) + "\n")
    manifest.flush()
    os.fsync(manifest.fileno())


def sort_manifest(out: Path) -> None:
    """Rewrite the manifest in row order (image order within a row)."""
    _rewrite_manifest(out, sorted(manifest_entries(out), key=lambda e: (e["row"], e["image"])))


def manifest_entries(out: Path) -> list[dict]:
    """The manifest's entries, in file order; a line that is not one (cut short by a crash, hand-edited into
    another shape, naming a file other than its own) is ignored with a warning."""
    path, entries = out / MANIFEST, []
    if not path.exists():
        return entries
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            entry = json.loads(raw)
        except (ValueError, RecursionError):
            log.warning("%s line %d ignored: not JSON (cut short by a crash?); its image is made again", path, number)
            continue
        why = _malformed(entry)
        if why is not None:
            log.warning("%s line %d ignored: %s; its image is made again", path, number, why)
            continue
        entries.append(entry)
    return entries


def _malformed(entry) -> str | None:
    """Why a manifest line is not an entry as record() writes it, or None."""
    if not isinstance(entry, dict):
        return f"a JSON object is expected, not {type(entry).__name__}"
    row, image, request = entry.get("row"), entry.get("image"), entry.get("request")
    if type(row) is not int or type(image) is not int or row < 1 or image < 0:
        return "its row and image must be whole numbers"
    if entry.get("file") != f"{IMAGES}/{row}-{image}.png":  # never a path of the line's choosing
        return f"its file must be {IMAGES}/{row}-{image}.png, not {entry.get('file')!r}"
    if not isinstance(entry.get("sha256"), str) or not isinstance(request, dict):
        return "it has no sha256 or request"
    if "prompt" not in request or type(request.get("n", 1)) is not int or \
            not (request.get("seed") is None or type(request.get("seed")) is int):
        return "its request's prompt, n or seed is not as the engine writes them"
    return None


def _rewrite_manifest(out: Path, entries: list[dict]) -> None:
    """The manifest replaced by `entries`, atomically (a temporary beside it, then a rename)."""
    path = out / MANIFEST
    temporary = path.with_name(f".{MANIFEST}.partial")
    temporary.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    os.replace(temporary, path)


def images_of(row: Row, defaults) -> int:
    request = row_request(row, 0, defaults, pictures=False)
    return request.batch_size * request.num_images_per_prompt


def resolved(request: GenerateRequest) -> dict:
    """The request as it ran, in the API's names (tuples become JSON lists): what draws it again."""
    return {name: getattr(request, API_FIELDS.get(name, name)) for name in API_REQUEST_FIELDS}


def _write_image(out: Path, row: Row, k: int, image, request: dict) -> dict:
    """Write one PNG atomically (a hidden temporary name, then a rename), with the request and seed that draw it
    again in its text chunks (as `python -m engine generate` writes them); its manifest fields."""
    from PIL.PngImagePlugin import PngInfo

    name = f"{row.line}-{k}.png"
    info = PngInfo()
    info.add_text("prompt", request["prompt"] if isinstance(request["prompt"], str) else json.dumps(request["prompt"]))
    info.add_text("seed", str(request["seed"]))
    info.add_text("request", json.dumps(request, default=list))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    temporary = out / PARTIAL / name  # beside images/, on its file system: no partial file is ever under images/
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, out / IMAGES / name)
    return {"row": row.line, "image": k, "file": f"{IMAGES}/{name}", "sha256": hashlib.sha256(data).hexdigest()}


def _resume(out: Path, rows: list[Row]) -> tuple[dict[int, list[dict]], dict[int, int]]:
    """From an earlier run's manifest and seeds file: the rows whose every image is there with its hash (line
    -> entries), and the seeds recorded for the others (where their input row is unchanged). Every such seed is
    in the seeds file before the manifest is rewritten with the kept entries only (one line per image, whatever
    is redone), so no kill between here and a row's last image loses its seed; stray partial files go."""
    for stray in (out / PARTIAL).glob("*"):
        stray.unlink()
    current = {row.line: row for row in rows}
    kept_seeds = _kept_seeds(out, current)
    if not (out / MANIFEST).exists():
        return {}, kept_seeds
    by_line: dict[int, list[dict]] = {}
    for entry in manifest_entries(out):
        by_line.setdefault(entry["row"], []).append(entry)
    done, seeds = {}, dict(kept_seeds)
    for line, entries in by_line.items():
        row = current.get(line)
        if row is None or entries[-1].get("input") != row.fields:
            continue  # the input changed: the row is made afresh
        if row.fields.get("seed") is None and entries[-1].get("request", {}).get("seed") is not None:
            seeds[line] = entries[-1]["request"]["seed"]  # what made its images
        wanted = entries[-1]["request"].get("n", 1) * _prompts(row)
        latest = {e["image"]: e for e in entries}
        if len(latest) == wanted and all(_intact(out, e) for e in latest.values()):
            done[line] = [latest[k] for k in sorted(latest)]
    _keep_seeds(out, current, {line: seed for line, seed in seeds.items()
                               if line not in done and kept_seeds.get(line) != seed})
    _rewrite_manifest(out, [e for line in sorted(done) for e in done[line]])
    return done, seeds


def _kept_seeds(out: Path, current: dict[int, Row]) -> dict[int, int]:
    """The seeds file's seeds (line -> seed; the latest line of a row wins) of the rows whose input is unchanged."""
    path, seeds = out / SEEDS, {}
    if not path.exists():
        return seeds
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            kept = json.loads(raw)
            line, seed = int(kept["row"]), int(kept["seed"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash: written again below if its row still needs it
        row = current.get(line)
        if row is not None and kept.get("input") == row.fields:
            seeds[line] = seed
    return seeds


def _keep_seeds(out: Path, current: dict[int, Row], seeds: dict[int, int]) -> None:
    """Append seeds to the seeds file, with each row's input (an edited row is made afresh), on disk on return."""
    if not seeds:
        return
    with open(out / SEEDS, "a", encoding="utf-8") as file:
        for line, seed in sorted(seeds.items()):
            file.write(json.dumps({"row": line, "input": current[line].fields, "seed": seed}) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _prompts(row: Row) -> int:
    prompt = row.fields.get("prompt")
    return len(prompt) if isinstance(prompt, list) else 1


def _intact(out: Path, entry: dict) -> bool:
    try:
        with os.fdopen(open_inside(out.resolve(), entry["file"]), "rb") as file:  # a link there is not followed
            return hashlib.sha256(file.read()).hexdigest() == entry["sha256"]
    except (OSError, ValueError):
        return False


class stop_on_signals:
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


def write_sheet(out: Path, rows: list[Row], path) -> None:
    """A contact sheet of every image in the manifest, captioned with its prompt."""
    from PIL import Image

    entries = manifest_entries(out)
    order = {row.line: i for i, row in enumerate(rows)}
    entries.sort(key=lambda e: (order.get(e["row"], len(order)), e["image"]))
    pictures, captions = [], []
    for entry in entries:  # the job's own images/ROW-K.png, links not followed
        try:
            with os.fdopen(open_inside(out.resolve(), entry["file"]), "rb") as file, Image.open(file) as picture:
                pictures.append(picture.convert("RGB"))
        except (OSError, ValueError) as exc:
            log.warning("%s left out of the contact sheet: %s", entry["file"], exc)
            continue
        captions.append(str(entry["request"]["prompt"]))
    contact_sheet(pictures, captions).save(path)
