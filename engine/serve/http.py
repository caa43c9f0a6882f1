"""The HTTP service: OpenAI-style image generation over the step-level batching scheduler (Starlette app).

    POST /v1/images/generations   {"prompt": "a red circle", "n": 1, "response_format": "b64_json",
                                   "seed": 0, "steps": 27, "guidance": 7.0, "negative_prompt": null,
                                   "noise_level": null, "scheduler": null, "timeout": 60}
                                  -> {"created": ..., "seed": 0, "data": [{"b64_json": "<PNG>"}]}
    POST /v1/images/edits         multipart/form-data, as OpenAI's images.edit sends it: image (a file), mask
                                  (a file, optional: inpainting), prompt, n, size, strength and the settings
                                  above -> the same answer (engine/serve/edits.py)
    GET /health/live              200 while the process serves HTTP
    GET /health/ready             200 once the model is loaded and warmed up, else 503
    GET /metrics                  Prometheus text format
    GET /v1/presets               the model's presets ({"presets": {name: what the quality gate measured}})
    GET /v1/limits                what one request may ask (the bounds below, as this model resolves them)
    GET /v1/models                the served model, in OpenAI's list shape (its name: --served-model-name)

`steps`, `guidance` and `noise_level` take a value or a list (one per stage), as the Python API does; `seed`
defaults to a random one, returned in the response. Bad input answers 400 naming the field; a full queue 503
with Retry-After; a request past its deadline 504; a NaN in a request's own stages 500 (the others go on).
A client that disconnects cancels its request at the next step boundary.

Bounds, checked before any model work (`Limits`; flags of `python -m engine serve`, or environment variables):
a body past max_body_bytes (an edit's: max_upload_bytes) is a 413 (read with a limit, never whole); JSON nested deeper than MAX_JSON_DEPTH, a
prompt or negative prompt longer than max_prompt_chars characters (far above the 77 tokens the text encoder
reads), guidance outside 0..MAX_GUIDANCE, and text that is not valid Unicode are 400s; so is a request's cost past
max_steps (in any stage), max_images or max_pixels_per_request, whose defaults fit the served model
(Limits.for_model). A request naming a model other than the served one is a 404 naming it. A request's
X-Request-ID (or a fresh one) is echoed in the response and named in its log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import io
import hmac
import json
import logging
import re
import sys
import threading
import time
import uuid
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Callable

from engine.errors import (EngineError, InvalidRequestError, NumericalError, QueueFullError, ShuttingDownError,
                           RequestTimeoutError)
from engine.images import edit_input, edit_size
from engine.options import API_FIELDS, DEFAULT_MAX_BATCH, GenerateRequest, request_from_api
from engine.serve.defaults import (DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S,
                                   DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_QUEUE, DEFAULT_POLICY, DEFAULT_TIMEOUT_S,
                                   POLICIES, Limits)
from engine.serve.metrics import Metrics
from engine.serve.scheduler import BatchingScheduler, warm_up
from engine.serve.edits import bound_decoders, parse_form
from engine.serve.schema import (EDIT_FIELDS, FIELDS, FILES, IGNORED_FIELDS, EditBody, ErrorResponse, GenerationBody,
                                 ImagesResponse)
from engine.version import __version__

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
HEALTH_PATHS = ("/health/live", "/v2/health/live", "/health/ready", "/v2/health/ready")  # open with API keys
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/[^\s'\",:]+")  # as a failure's message names a file
MAX_JSON_DEPTH = 8  # the deepest a valid body goes is 3: {"steps": [[999, 500], 27]}
MAX_GUIDANCE = 50.0  # IF's own are 4 and 7; far past this a step overflows (a 400, not a NumericalError's 500)


API_NAMES = {core: api for api, core in API_FIELDS.items()}  # the core's names -> the API's, in messages and `param`
# Our error kinds -> OpenAI's error type; the kind itself is the error's `code`.
ERROR_TYPES = {"invalid_request": "invalid_request_error", "unauthorized": "authentication_error"}


class Service:
    """The model, its scheduler and metrics, and whether it is ready; shared by the app's handlers."""

    def __init__(self, load: Callable, max_batch: int, max_queue: int, timeout_s: float, warmup: bool,
                 policy: str, limits: Limits, api_keys: tuple[str, ...] = (), model_name: str | None = None,
                 request_defaults: dict | None = None, show_model_path: bool = False):
        self.load = load  # () -> Pipeline
        self.request_defaults = request_defaults or {}  # create_app's
        self.limits = limits  # with the model-dependent ones filled in once the model is loaded
        self.model_name = model_name  # what /v1/models lists and a request's "model" may name (None: from the source)
        self.show_model_path = show_model_path  # whether clients may see where the model is on disk
        self.started = int(time.time())
        self.api_keys = tuple(key.encode() for key in api_keys)
        self.draining = threading.Event()  # set at SIGTERM: readiness 503, new requests 503
        self.max_batch, self.max_queue, self.timeout_s, self.warmup = max_batch, max_queue, timeout_s, warmup
        self.policy = policy
        self.pipeline = None
        self.warmup_seconds: dict[str, float] = {}  # what the warm-up cost, per part (scheduler.warm_up)
        self.scheduler: BatchingScheduler | None = None
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.failure: str | None = None  # why loading failed, for /health/ready
        self.scheduling = False  # whether start() runs the scheduler's thread (tests drive it by hand)

    def start(self, run_scheduler: bool = True) -> None:
        """Load, warm up (scheduler.warm_up), then start the scheduler; /health/ready turns 200 after."""
        try:
            self.pipeline = self.load()
            self.model_name = self.model_name or served_name(self.pipeline.source, self.show_model_path)
            defaults = self.pipeline.settings(GenerateRequest("limits"))  # each stage's default settings
            self.limits = self.limits.for_model([s.steps for s in defaults], self.pipeline.image_size,
                                                self.max_batch)
            caching = served_caching(self.pipeline, self.request_defaults)  # the defaults fit the model, too
            if self.warmup:
                self.warmup_seconds = warm_up(self.pipeline, self.max_batch, caching)
                parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.warmup_seconds.items())
                print(f"warm-up: {sum(self.warmup_seconds.values()):.1f} s ({parts})", file=sys.stderr, flush=True)
            self.scheduler = BatchingScheduler(self.pipeline, self.max_batch, self.max_queue, self.policy)
            self.scheduler.on_batch = self.metrics.batch
            self.scheduler.on_finish = self.metrics.job_finished
            if run_scheduler:
                self.scheduler.start()
                self.scheduling = True
            self.ready.set()
        except Exception as exc:  # reported by /health/ready and the log; the process stays up to say so
            self.failure = f"{type(exc).__name__}: {exc}"
            if not self.show_model_path:  # the health routes are open: no paths from this disk (the log has them)
                self.failure = ABSOLUTE_PATH.sub("<path>", self.failure)
            log.exception("the model could not be loaded")

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()

    def fault(self) -> str | None:
        """Why this process can no longer serve (its model failed to load, or its scheduler stopped), or None.
        Liveness and Ray's check_health fail on it, so the orchestrator restarts the process."""
        if self.failure is not None:
            return f"the model could not be loaded: {self.failure}"
        if self.ready.is_set() and self.scheduling and not self.draining.is_set() and not self.scheduler.running:
            return "the scheduler has stopped"
        return None


def create_app(load, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
               timeout_s: float = DEFAULT_TIMEOUT_S, warmup: bool = True, run_scheduler: bool = True,
               policy: str = DEFAULT_POLICY, limits: Limits | None = None, api_keys=(), metrics_open: bool = False,
               readiness: Callable[[], str | None] | None = None, model_name: str | None = None,
               request_defaults: dict | None = None, show_model_path: bool = False):
    """The FastAPI app. `load`: a Pipeline (started at once), or a function that loads one (called in the
    background at startup, so /health/live answers while the model loads). `policy`: the scheduler's batching
    policy. api_keys: when given, every route but the health routes (HEALTH_PATHS) needs `Authorization: Bearer
    KEY` with one of them: generation, /v1/models, /v1/limits, /v1/presets, /openapi.json, /docs, /redoc, and
    /metrics unless metrics_open (for a scraper that cannot send a token; /metrics names no model or path).
    An empty key is refused. model_name: the name clients see (default: the model's folder name, or its path
    with show_model_path). `readiness`: a further check for /health/ready, giving why it is not ready or None
    (Ray: the deployment's status); it may block.
    request_defaults: the speed settings ({"preset": ...} and/or {"cache": ...}, API fields) of a request that
    names neither a preset nor a cache; checked now, and against the model once it is loaded."""
    from fastapi import FastAPI

    loaded = not callable(load) or hasattr(load, "stages")
    loader = (lambda: load) if loaded else load
    if policy not in POLICIES:
        raise InvalidRequestError(f"unknown batching policy {policy!r}; choose one of {', '.join(POLICIES)}")
    limits = limits or Limits.from_environment()
    limits.check(max_batch)  # before the model loads
    request_defaults = dict(request_defaults or {})
    if set(request_defaults) - set(SPEED_FIELDS):
        raise InvalidRequestError(f"request_defaults takes {', '.join(SPEED_FIELDS)}, got {sorted(request_defaults)}")
    request_from_api({"prompt": "check", **request_defaults})  # bad values are refused before the model loads
    api_keys = tuple(api_keys)
    if any(not isinstance(key, str) or not key.strip() for key in api_keys):
        raise InvalidRequestError("an API key is empty (or all whitespace): was $KEY set? An empty key would let "
                                  "'Authorization: Bearer ' through; give a real key, or none for no auth")
    service = Service(loader, max_batch, max_queue, timeout_s, warmup, policy, limits, api_keys, model_name,
                      request_defaults, show_model_path)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=service.start, args=(run_scheduler,), name="engine-load", daemon=True)
        thread.start()
        if loaded:  # nothing to load: ready before the first request
            await asyncio.to_thread(thread.join)
        try:
            yield
        finally:
            thread.join()
            service.stop()

    # FastAPI's own /openapi.json, /docs and /redoc would stay open: they are added below, behind the keys.
    app = FastAPI(title="cascade-engine", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None,
                  description="OpenAI-style image generation over a cascaded diffusion model, batched per step.")
    keyed = functools.partial(_guarded, service, counted=False)  # every route but health
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 500, 503, 504)}
    body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": GenerationBody.model_json_schema(ref_template="#/components/schemas/{model}")}}}}
    # The handlers read the raw request themselves (the body with a size limit, then the schema and the core
    # check), so FastAPI is given the schema for /openapi.json only.
    _route(app, "/v1/images/generations", "POST", _guarded(service, _generations(service, _json_body)),
           responses={200: {"model": ImagesResponse}, **errors}, openapi_extra=body)
    form = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "prompt"],
        "properties": {**{name: {"type": "string", "format": "binary"} for name in FILES},
                       **EditBody.model_json_schema()["properties"]}}}}}}
    _route(app, "/v1/images/edits", "POST", _guarded(service, _generations(service, _form_body)),
           responses={200: {"model": ImagesResponse}, **errors}, openapi_extra=form)
    live, ready = _live(service), _ready(service, readiness)
    for path in ("/health/live", "/v2/health/live"):
        _route(app, path, "GET", live)
    for path in ("/health/ready", "/v2/health/ready"):
        _route(app, path, "GET", ready)
    metrics = _metrics(service)
    _route(app, "/metrics", "GET", metrics if metrics_open else keyed(metrics))
    _route(app, "/v1/presets", "GET", keyed(_presets(service)))
    _route(app, "/v1/limits", "GET", keyed(_limits(service)))
    models = keyed(_models(service))
    _route(app, "/v1/models", "GET", models)
    _route(app, "/v1/models/{model:path}", "GET", models)
    for path, handler in _described(app).items():
        _route(app, path, "GET", keyed(handler), include_in_schema=False)
    app.state.service = service
    return app


def served_name(source: str, show_path: bool) -> str:
    """The model's name for clients: its first folder's name ("IF-I-XL-v1.0"), or the source as given (a path)
    where the operator asked for it (--show-model-path)."""
    return source if show_path else (Path(source.split(", ")[0]).name or source)


def _described(app) -> dict:
    """FastAPI's /openapi.json, /docs and /redoc as handlers, so that they can stand behind the API keys."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from starlette.responses import JSONResponse

    async def spec(request):
        return JSONResponse(app.openapi())

    async def docs(request):
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    async def redoc(request):
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")
    return {"/openapi.json": spec, "/docs": docs, "/redoc": redoc}


def _route(app, path: str, method: str, handler, **openapi) -> None:
    """Add `handler(request)` (a Starlette-style handler) to the FastAPI app."""
    from fastapi import Request

    async def endpoint(request):
        return await handler(request)

    endpoint.__annotations__ = {"request": Request}  # the class itself: this module's annotations are strings

    endpoint.__name__ = (path.strip("/").replace("/", "_").replace(".", "_") or "root") + "_" + method.lower()
    app.add_api_route(path, endpoint, methods=[method], **openapi)


def _error(status: int, message: str, kind: str, headers: dict | None = None):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, field names as the API spells
    them (param: the field a 400 is about, where the message starts with one)."""
    from starlette.responses import JSONResponse

    for core, api in API_NAMES.items():
        message = message.replace(core, api)
    first = message.split(" ", 1)[0]
    param = first if kind == "invalid_request" and first in EDIT_FIELDS | IGNORED_FIELDS | set(FILES) else None
    body = {"message": message, "type": ERROR_TYPES.get(kind, "server_error"), "param": param, "code": kind}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _live(service: Service):
    async def live(request):
        from starlette.responses import JSONResponse

        fault = service.fault()
        if fault is not None:  # a pod that cannot serve is restarted, not kept waiting
            return _error(503, fault, "not_live")
        return JSONResponse({"status": "live"})
    return live


def _ready(service: Service, readiness: Callable[[], str | None] | None):
    async def ready(request):
        from starlette.responses import JSONResponse

        if service.draining.is_set():
            return _error(503, "the service is shutting down", "draining")
        fault = service.fault()
        if fault is not None:
            return _error(503, fault, "not_ready")
        if not service.ready.is_set():
            return _error(503, "the model is loading and warming up", "not_ready", {"Retry-After": "5"})
        reason = await asyncio.to_thread(readiness) if readiness is not None else None
        if reason is not None:
            return _error(503, reason, "not_ready", {"Retry-After": "5"})
        return JSONResponse({"status": "ready", "model": service.model_name})
    return ready


def _presets(service: Service):
    async def presets(request):
        from starlette.responses import JSONResponse

        if not service.ready.is_set():
            return _error(503, "the model is loading and warming up", "not_ready", {"Retry-After": "5"})
        return JSONResponse({"presets": {name: preset.certified for name, preset in service.pipeline.presets.items()}})
    return presets


def _limits(service: Service):
    async def limits(request):
        from starlette.responses import JSONResponse

        if not service.ready.is_set():
            return _error(503, "the model is loading and warming up", "not_ready", {"Retry-After": "5"})
        return JSONResponse({"limits": dataclasses.asdict(service.limits), "max_batch": service.max_batch,
                             "timeout_s": service.timeout_s})
    return limits


def _models(service: Service):
    """GET /v1/models (the served model, in OpenAI's list shape) and /v1/models/NAME (it, or a 404)."""
    async def models(request):
        from starlette.responses import JSONResponse

        if not service.ready.is_set():
            return _error(503, "the model is loading and warming up", "not_ready", {"Retry-After": "5"})
        card = {"id": service.model_name, "object": "model", "created": service.started, "owned_by": "cascade-engine"}
        asked = request.path_params.get("model")
        if asked is None:
            return JSONResponse({"object": "list", "data": [card]})
        if asked != service.model_name:
            return _unknown_model(service, asked)
        return JSONResponse(card)
    return models


def _unknown_model(service: Service, asked):
    return _error(404, f"model {asked!r} is not served here; this service serves {service.model_name!r}",
                  "model_not_found")


def output_size(request: GenerateRequest, pipeline) -> tuple[int, int] | None:
    """(width, height) of the request's images: the model's size, or an edit's, whose picture keeps its aspect
    (images.edit_size at the last stage that edits, times any x4 upscaler after it); None where unknown."""
    edited = pipeline.edited_image(request)
    size = pipeline.image_size
    if edited is None or size is None:
        return None if size is None else (size, size)
    width, height = edit_input(edited, None).size
    stages = [stage for stage in pipeline.stages if stage.kind != "latent_upscaler"]
    width, height = edit_size(width, height, stages[-1].size)
    scale = size // stages[-1].size  # the x4 upscalers after it
    return width * scale, height * scale


def check_cost(request: GenerateRequest, pipeline, limits: Limits) -> None:
    """InvalidRequestError naming the field where the request asks more than the limits allow (steps in any
    stage, images, pixels), before any model work; the limits as Limits.for_model filled them."""
    for stage, settings in zip(pipeline.stages, pipeline.settings(request)):
        if settings.steps > limits.max_steps:
            raise InvalidRequestError(f"steps asks for {settings.steps} steps of {stage.name}; this service takes at "
                                      f"most {limits.max_steps} per stage (--max-steps)")
    images = request.batch_size * request.num_images_per_prompt
    if images > limits.max_images:
        raise InvalidRequestError(f"n asks for {images} images (prompts x n); this service takes at most "
                                  f"{limits.max_images} per request (--max-images)")
    size = output_size(request, pipeline)
    if size is not None and limits.max_pixels_per_request is not None and \
            images * size[0] * size[1] > limits.max_pixels_per_request:
        raise InvalidRequestError(f"n asks for {images} images of {size[0]}x{size[1]}, {images * size[0] * size[1]} "
                                  f"pixels; this service takes at most {limits.max_pixels_per_request} per request "
                                  "(--max-pixels-per-request)")


def _metrics(service: Service):
    async def metrics(request):
        from starlette.responses import PlainTextResponse

        depth = service.scheduler.queue_depth if service.scheduler is not None else 0
        return PlainTextResponse(service.metrics.render(depth), media_type="text/plain; version=0.0.4")
    return metrics


SPEED_FIELDS = ("preset", "cache")  # what a service's request_defaults may set


def served_caching(pipeline, request_defaults: dict) -> list:
    """The feature caching a service's requests can run, as per-stage settings for its warm-up: every preset's
    and its request_defaults' (InvalidRequestError where those do not fit the model)."""
    defaults = pipeline.settings(request_from_api({"prompt": "check", **request_defaults}))
    return [[stage.presets[name] for stage in pipeline.stages] for name in pipeline.presets] + [defaults]


def with_defaults(body, defaults: dict):
    """The body with the service's speed settings where it names none of them (as a unit: a request's own
    preset is never mixed with the service's cache)."""
    if not defaults or not isinstance(body, dict) or any(body.get(name) is not None for name in SPEED_FIELDS):
        return body
    return {**body, **defaults}


def parse_body(body, timeout_s: float, image_size: int | None, limits: Limits = Limits(),
               pictures: list | None = None, mask=None, pipeline=None) -> tuple[GenerateRequest, float]:
    """A GenerateRequest and the request's timeout from a JSON body, or an edit's form fields with its pictures
    and mask (read by edits.parse_form; `pipeline` then gives the size it makes); InvalidRequestError naming
    the field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    if _depth(body) > MAX_JSON_DEPTH:
        raise InvalidRequestError(f"the body is nested more than {MAX_JSON_DEPTH} levels deep")
    for name in ("prompt", "negative_prompt"):
        texts = body.get(name)
        for text in texts if isinstance(texts, list) else [texts]:
            if isinstance(text, str) and len(text) > limits.max_prompt_chars:
                raise InvalidRequestError(f"{name} is {len(text)} characters; this service takes at most "
                                          f"{limits.max_prompt_chars} (the text encoder reads 77 tokens)")
    for guidance in _flat(body.get("guidance")):
        if isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and not 0 <= guidance <= MAX_GUIDANCE:
            raise InvalidRequestError(f"guidance must be in 0..{MAX_GUIDANCE:g}, got {guidance!r}")
    known = FIELDS if pictures is None else EDIT_FIELDS
    unknown = sorted(set(body) - known - IGNORED_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))} "
                                  f"(and OpenAI's {', '.join(sorted(IGNORED_FIELDS))}, ignored)")
    if body.get("output_format", "png") != "png":
        raise InvalidRequestError("output_format must be 'png' (this service returns PNGs)")
    if "prompt" not in body:
        raise InvalidRequestError("prompt is required")
    if body.get("response_format", "b64_json") != "b64_json":
        raise InvalidRequestError("response_format must be 'b64_json' (this service returns PNGs inline)")
    _check_types(body, GenerationBody if pictures is None else EditBody)
    timeout = body.get("timeout", timeout_s)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= timeout_s:
        raise InvalidRequestError(f"timeout must be a number of seconds in (0, {timeout_s:g}], got {timeout!r}")
    image = None if pictures is None else pictures[0] if len(pictures) == 1 else pictures
    request = request_from_api({**body, "output_type": "pil"}, image=image, mask_image=mask)
    size = (image_size, image_size) if pictures is None or pipeline is None else output_size(request, pipeline)
    if "size" in body and body["size"] != "auto" and size is not None and body["size"] != f"{size[0]}x{size[1]}":
        raise InvalidRequestError(f"size must be '{size[0]}x{size[1]}' for this model"
                                  f"{' and picture' if pictures else ''} (or 'auto'), got {body['size']!r}")
    return request, float(timeout)


def _check_types(body: dict, schema) -> None:
    """The schema's type check (schema.GenerationBody or EditBody); InvalidRequestError naming the first wrong
    field."""
    from pydantic import ValidationError

    try:
        schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = first["loc"][0]
        got = body.get(field)
        description = schema.model_fields[field].description
        raise InvalidRequestError(f"{field} has the wrong type ({type(got).__name__} {str(got)[:40]!r}): it takes "
                                  f"{description}") from None


def _depth(value, limit: int = MAX_JSON_DEPTH + 1) -> int:
    """Nesting depth of a parsed JSON value, counted iteratively and no further than `limit`."""
    depth, level = 0, [value]
    while level and depth < limit:
        children = [v for item in level if isinstance(item, (list, dict))
                    for v in (item.values() if isinstance(item, dict) else item)]
        depth += 1 if any(isinstance(item, (list, dict)) for item in level) else 0
        level = children
    return depth


def _flat(value) -> list:
    """The numbers of a per-stage value (one, or a list)."""
    return value if isinstance(value, list) else [value]


def _guarded(service: Service, handler, counted: bool = True):
    """`handler` behind the API keys, if the service has any: a Bearer token compared in constant time.
    counted: a refusal counts as a generation request ("unauthorized")."""
    if not service.api_keys:
        return handler

    async def guarded(request):
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # compare_digest against every key, so the time taken says nothing about which one came close; an empty
        # token never matches (create_app refuses empty keys too)
        matches = [hmac.compare_digest(given, key) for key in service.api_keys]
        if scheme.lower() != "bearer" or not given or not any(matches):
            if counted:
                service.metrics.request("unauthorized")
            return _error(401, "a valid API key is required: Authorization: Bearer KEY", "unauthorized",
                          {"WWW-Authenticate": "Bearer"})
        return await handler(request)
    return guarded


def _json_body(service: Service, raw: bytearray, content_type: str) -> tuple[dict, dict]:
    """/v1/images/generations: the JSON body, and no pictures (parse_body's keywords)."""
    try:
        return json.loads(raw), {}
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's own limit
        raise InvalidRequestError("the body is not valid JSON (or nested too deeply)") from None


def _form_body(service: Service, raw: bytearray, content_type: str) -> tuple[dict, dict]:
    """/v1/images/edits: the form's fields, and its pictures and mask (engine/serve/edits.py)."""
    limits = service.limits  # filled for the model by Service.start, which comes before any request
    fields, pictures, mask = parse_form(raw, content_type, limits.max_images or DEFAULT_MAX_BATCH,
                                        limits.max_pixels_per_request)
    return fields, {"pictures": pictures, "mask": mask, "pipeline": service.pipeline}


def _generations(service: Service, read_body):
    """The handler of a route that generates: read_body(service, raw body, content type) -> (fields, the
    pictures parse_body takes), InvalidRequestError for a body it cannot read."""
    async def generations(request):
        # The caller's X-Request-ID (or a fresh one), echoed on every answer, errors included.
        request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
        start = time.perf_counter()
        response = await _generate(service, request, request_id, read_body)
        response.headers["X-Request-ID"] = request_id
        if response.status_code != 200:  # a 200's line, with its images and timings, is written by _generate
            log.info(json.dumps({"request_id": request_id, "status": response.status_code,
                                 "seconds": round(time.perf_counter() - start, 4)}))
        return response
    return generations


async def _read_body(request, limit: int) -> bytearray | None:
    """The body, read with a limit and never whole; None past `limit` bytes."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            return None
    return raw


async def _generate(service: Service, request, request_id: str, read_body):
    """One generation request's answer (see the module docstring for the statuses)."""
    from starlette.responses import JSONResponse

    if service.draining.is_set():
        service.metrics.request("shutdown")
        return _error(503, "the service is shutting down: retry on another replica", "draining",
                      {"Retry-After": str(RETRY_AFTER_S)})
    if not service.ready.is_set():
        return _error(503, "the model is loading and warming up", "not_ready", {"Retry-After": "5"})
    limit = service.limits.max_body_bytes if read_body is _json_body else service.limits.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        service.metrics.request("invalid")
        return _error(413, f"the body is over {limit} bytes", "invalid_request")
    try:  # a client that drips its body holds nothing for long
        raw = await asyncio.wait_for(_read_body(request, limit), service.limits.body_timeout_s)
    except asyncio.TimeoutError:
        service.metrics.request("invalid")
        return _error(408, f"the body did not arrive within {service.limits.body_timeout_s:g} s", "invalid_request")
    except Exception as exc:  # the body reader's own failures on what the client sent (or did not)
        return _unreadable(service, request_id, exc)
    if raw is None:
        service.metrics.request("invalid")
        return _error(413, f"the body is over {limit} bytes", "invalid_request")
    try:  # the body is parsed, and an upload's pictures decoded, off the event loop
        body, pictures = await asyncio.to_thread(read_body, service, raw, request.headers.get("content-type", ""))
    except InvalidRequestError as exc:
        service.metrics.request("invalid")
        return _error(400, str(exc), "invalid_request")
    except Exception as exc:  # a parser or decoder failing on client input: still that client's 400
        return _unreadable(service, request_id, exc)
    if isinstance(body, dict) and body.get("model") is not None and body["model"] != service.model_name:
        service.metrics.request("invalid")
        return _unknown_model(service, body["model"])
    try:
        gen_request, timeout = parse_body(with_defaults(body, service.request_defaults), service.timeout_s,
                                          service.pipeline.image_size, service.limits, **pictures)
        check_cost(gen_request, service.pipeline, service.limits)
        future = service.scheduler.submit(gen_request, timeout_s=timeout)
    except InvalidRequestError as exc:
        service.metrics.request("invalid")
        return _error(400, str(exc), "invalid_request")
    except QueueFullError as exc:
        service.metrics.request("rejected")
        return _error(503, str(exc), "queue_full", {"Retry-After": str(RETRY_AFTER_S)})

    waiting = asyncio.wrap_future(future)
    disconnect = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({waiting, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if not waiting.done():
        future.cancel()  # dropped at the next step boundary; its slot frees up
        return _error(499, "client closed the request", "cancelled")
    try:
        generation = waiting.result()
    except RequestTimeoutError as exc:
        # x-should-retry: the OpenAI SDKs resend a 504 by default, which would spend its compute again.
        return _error(504, str(exc), "timeout", {"x-should-retry": "false"})
    except NumericalError as exc:
        return _error(500, str(exc), "numerical_error")
    except CancelledError:
        return _error(499, "the request was cancelled", "cancelled")
    except ShuttingDownError as exc:
        return _error(503, str(exc), "draining", {"Retry-After": str(RETRY_AFTER_S)})
    except EngineError as exc:
        return _error(500, str(exc), "engine_error")
    # PNG encoding takes a few hundred ms per large image: off the event loop, so probes and others go on.
    data = [{"b64_json": png} for png in await asyncio.gather(
        *(asyncio.to_thread(_png_base64, image) for image in generation.images))]
    log.info(json.dumps({"request_id": request_id, "status": 200, "images": len(data), "seed": gen_request.seed,
                         "prompt_chars": sum(map(len, gen_request.prompts)),
                         "seconds": {k: round(v, 4) for k, v in generation.timings.items()}}))
    return JSONResponse({"created": int(time.time()), "seed": gen_request.seed, "data": data})


def _unreadable(service: Service, request_id: str, exc: Exception):
    """The 400 for a body that a reader or parser failed on in a way of its own (not an InvalidRequestError):
    counted as invalid, and logged in one line naming the request and the exception, without a traceback."""
    service.metrics.request("invalid")
    what = f"{type(exc).__name__}: {str(exc)[:200]}"
    log.warning(json.dumps({"request_id": request_id, "unreadable_body": what}))
    return _error(400, f"the body could not be read ({what}); send a well-formed body", "invalid_request")


async def _disconnected(request) -> None:
    """Return when the client goes away. The body has been read, so the next ASGI message the server sends
    is http.disconnect (uvicorn sends it on a closed socket), with no polling while the request waits."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def run(app, host: str, port: int, log_level: str = "info", drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS, keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S):
    """Serve `app` with uvicorn until SIGTERM or SIGINT, then drain: readiness turns 503 at once and new requests
    get 503 while the listener stays open (so a load balancer sees it go), the requests in flight get up to
    `drain_timeout_s` to finish, and what is left then gets a 503 (counted as "shutdown"). A second signal ends
    it at once. Past `max_connections` open connections a new request gets a 503 from uvicorn; an idle
    keep-alive connection closes after `keep_alive_s`, and a connection whose request headers have not arrived
    whole `header_timeout_s` after it opened (or after its previous request) gets a 408 and is closed."""
    import uvicorn  # optional: the [serve] extra

    service = app.state.service
    bound_decoders()  # Pillow's own bomb bound, process-wide, so set here in the serving process, not by create_app

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if service.draining.is_set():  # the second signal
                return super().handle_exit(sig, frame)
            service.draining.set()
            log.warning("signal %s: draining for up to %g s, then exiting", sig, drain_timeout_s)
            threading.Thread(target=self._drain, args=(sig, frame), daemon=True).start()

        def _drain(self, sig, frame):
            deadline = time.monotonic() + drain_timeout_s
            while time.monotonic() < deadline and service.scheduler is not None and not service.scheduler.idle:
                time.sleep(0.05)
            if service.scheduler is not None and not service.scheduler.idle:
                service.scheduler.fail_all(ShuttingDownError(
                    f"the service is shutting down and its {drain_timeout_s:g} s drain ran out; retry elsewhere"))
                time.sleep(0.5)  # the handlers answer their 503s before the listener closes
            super().handle_exit(sig, frame)

    DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level, limit_concurrency=max_connections,
                                  timeout_keep_alive=keep_alive_s, http=header_timeout_protocol(header_timeout_s))
                   ).run()


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline for request headers, which uvicorn lacks: a client that opens a
    connection and sends its headers slowly, or never, holds a connection slot for `seconds` at most."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(seconds, self._headers_late)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # IDLE after reading: headers begun but not whole. A request whose headers are whole moves h11 on.
            waiting = self.conn.their_state is h11.IDLE
            if waiting and self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._headers_late)
            elif not waiting and self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    return HeaderTimeoutProtocol


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
