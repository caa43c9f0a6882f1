"""The HTTP service: OpenAI-style image generation over the step-level batching scheduler (Starlette app).

    POST /v1/images/generations   {"prompt": "a red circle", "n": 1, "response_format": "b64_json",
                                   "seed": 0, "steps": 27, "guidance": 7.0, "negative_prompt": null,
                                   "noise_level": null, "scheduler": null, "timeout": 60}
                                  -> {"created": ..., "seed": 0, "data": [{"b64_json": "<PNG>"}]}
    GET /health/live              200 while the process serves HTTP
    GET /health/ready             200 once the model is loaded and warmed up, else 503
    GET /metrics                  Prometheus text format

`steps`, `guidance` and `noise_level` take a value or a list (one per stage), as the Python API does; `seed`
defaults to a random one, returned in the response. Bad input answers 400 naming the field; a full queue 503
with Retry-After; a request past its deadline 504; a NaN in a request's own stages 500 (the others go on).
A client that disconnects cancels its request at the next step boundary.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import threading
import time
from concurrent.futures import CancelledError
from typing import Callable

from engine.errors import (EngineError, InvalidRequestError, NumericalError, QueueFullError,
                           RequestTimeoutError)
from engine.options import GenerateRequest
from engine.serve.metrics import Metrics
from engine.serve.scheduler import (DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_POLICY, POLICIES,  # noqa: F401
                                    BatchingScheduler)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # loopback: nothing listens beyond this machine unless the user says so
DEFAULT_PORT = 8000
DEFAULT_TIMEOUT_S = 300.0  # a request's longest life, queue time included; a body's "timeout" may shorten it
RETRY_AFTER_S = 1
FIELDS = {"prompt", "n", "response_format", "seed", "steps", "guidance", "negative_prompt", "noise_level",
          "scheduler", "timeout", "size", "model", "user"}  # "model" and "user": accepted for OpenAI clients, not used


class Service:
    """The model, its scheduler and metrics, and whether it is ready; shared by the app's handlers."""

    def __init__(self, load: Callable, max_batch: int, max_queue: int, timeout_s: float, warmup: bool,
                 policy: str):
        self.load = load  # () -> Pipeline
        self.max_batch, self.max_queue, self.timeout_s, self.warmup = max_batch, max_queue, timeout_s, warmup
        self.policy = policy
        self.pipeline = None
        self.scheduler: BatchingScheduler | None = None
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.failure: str | None = None  # why loading failed, for /health/ready

    def start(self, run_scheduler: bool = True) -> None:
        """Load, warm up (one short generation), then start the scheduler; /health/ready turns 200 after."""
        try:
            self.pipeline = self.load()
            if self.warmup:
                self.pipeline.run(GenerateRequest("warm-up", steps=1))
            self.scheduler = BatchingScheduler(self.pipeline, self.max_batch, self.max_queue, self.policy)
            self.scheduler.on_batch = self.metrics.batch
            self.scheduler.on_finish = self.metrics.job_finished
            if run_scheduler:
                self.scheduler.start()
            self.ready.set()
        except Exception as exc:  # reported by /health/ready and the log; the process stays up to say so
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("the model could not be loaded")

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()


def create_app(load, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
               timeout_s: float = DEFAULT_TIMEOUT_S, warmup: bool = True, run_scheduler: bool = True,
               policy: str = DEFAULT_POLICY):
    """The Starlette app. `load`: a Pipeline, or a function that loads one (called in the background at
    startup, so /health/live answers while the model loads). `policy`: the scheduler's batching policy."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    loader = load if callable(load) and not hasattr(load, "stages") else (lambda: load)
    if policy not in POLICIES:
        raise InvalidRequestError(f"unknown batching policy {policy!r}; choose one of {', '.join(POLICIES)}")
    service = Service(loader, max_batch, max_queue, timeout_s, warmup, policy)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=service.start, args=(run_scheduler,), name="engine-load", daemon=True)
        thread.start()
        try:
            yield
        finally:
            thread.join()
            service.stop()

    routes = [Route("/v1/images/generations", _generations(service), methods=["POST"]),
              Route("/health/live", _live, methods=["GET"]),
              Route("/health/ready", _ready(service), methods=["GET"]),
              Route("/metrics", _metrics(service), methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


def _error(status: int, message: str, kind: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


async def _live(request):
    from starlette.responses import JSONResponse

    return JSONResponse({"status": "live"})


def _ready(service: Service):
    async def ready(request):
        from starlette.responses import JSONResponse

        if service.ready.is_set():
            return JSONResponse({"status": "ready", "model": service.pipeline.source})
        if service.failure is not None:
            return _error(503, f"the model could not be loaded: {service.failure}", "not_ready")
        return _error(503, "the model is loading and warming up", "not_ready", {"Retry-After": "5"})
    return ready


def _metrics(service: Service):
    async def metrics(request):
        from starlette.responses import PlainTextResponse

        depth = service.scheduler.queue_depth if service.scheduler is not None else 0
        return PlainTextResponse(service.metrics.render(depth), media_type="text/plain; version=0.0.4")
    return metrics


def parse_body(body, timeout_s: float, image_size: int | None) -> tuple[GenerateRequest, float]:
    """A GenerateRequest and the request's timeout from a JSON body; InvalidRequestError naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    if "prompt" not in body:
        raise InvalidRequestError("prompt is required")
    if body.get("response_format", "b64_json") != "b64_json":
        raise InvalidRequestError("response_format must be 'b64_json' (this service returns PNGs inline)")
    if "size" in body and body["size"] != f"{image_size}x{image_size}":
        raise InvalidRequestError(f"size must be '{image_size}x{image_size}' for this model, got {body['size']!r}")
    timeout = body.get("timeout", timeout_s)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= timeout_s:
        raise InvalidRequestError(f"timeout must be a number of seconds in (0, {timeout_s:g}], got {timeout!r}")
    request = GenerateRequest(
        body["prompt"], negative_prompt=body.get("negative_prompt"), num_images_per_prompt=body.get("n", 1),
        seed=body.get("seed"),  # None: GenerateRequest draws a fresh one, as for every caller
        steps=_per_stage(body.get("steps")),
        guidance=_per_stage(body.get("guidance")), noise_level=_per_stage(body.get("noise_level")),
        scheduler=body.get("scheduler"), output_type="pil")
    return request, float(timeout)


def _per_stage(value):
    """A JSON list is one value per stage (the Python API's tuple); a stage's own timestep list nests inside."""
    return tuple(value) if isinstance(value, list) else value


def _generations(service: Service):
    async def generations(request):
        from starlette.responses import JSONResponse

        if not service.ready.is_set():
            return _error(503, "the model is loading and warming up", "not_ready", {"Retry-After": "5"})
        try:
            body = await request.json()
        except ValueError:
            service.metrics.request("invalid")
            return _error(400, "the body is not valid JSON", "invalid_request")
        try:
            gen_request, timeout = parse_body(body, service.timeout_s, service.pipeline.image_size)
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
            return _error(504, str(exc), "timeout")
        except NumericalError as exc:
            return _error(500, str(exc), "numerical_error")
        except CancelledError:
            return _error(499, "the request was cancelled", "cancelled")
        except EngineError as exc:
            return _error(500, str(exc), "engine_error")
        data = [{"b64_json": _png_base64(image)} for image in generation.images]
        return JSONResponse({"created": int(time.time()), "seed": gen_request.seed, "data": data})
    return generations


async def _disconnected(request) -> None:
    """Return when the client goes away. The body has been read, so the next ASGI message the server sends
    is http.disconnect (uvicorn sends it on a closed socket), with no polling while the request waits."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
