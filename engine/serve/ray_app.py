"""The same HTTP app as a Ray Serve deployment: replicas (each with its own model and step-level scheduler),
`num_gpus` per replica, optional autoscaling. Ray Serve's proxy spreads requests over the replicas.

    python -m engine serve --ray [--replicas N | --autoscale MIN:MAX] [--num-gpus G] [--ray-address ADDR]

Without --ray-address a local Ray cluster starts in-process; with it (or RAY_ADDRESS set, e.g.
`ray://head-node:10001`), the deployment goes to that cluster, whose nodes need the engine installed.

A replica loads and warms its model in its constructor, so Ray sends it nothing before it can serve; a model
that cannot load fails the constructor, and after Ray's retries the deployment is DEPLOY_FAILED with the
reason. `check_health` fails when the replica can no longer serve (its scheduler stopped), and Ray replaces it.
`/health/ready` is the deployment's readiness (Ray's status of it, not the one replica that answers). Metrics go
through `ray.serve.metrics` too, tagged with the replica by Ray, so Ray's metrics export aggregates every
replica; `/metrics` through the proxy is one replica's, named by the X-Replica-ID header every answer carries.
"""

from __future__ import annotations

import threading
import time

from engine.errors import EngineError, InvalidRequestError
from engine.loading import load
from engine.serve.http import create_app, served_caching
from engine.serve.metrics import BATCH_BUCKETS, SECONDS_BUCKETS
from engine.options import DEFAULT_MAX_BATCH
from engine.serve.defaults import DEFAULT_MAX_QUEUE
from engine.serve.scheduler import warm_up

DEPLOYMENT_NAME = "cascade-engine"
HEALTH_CHECK_PERIOD_S = 10.0
STATUS_TTL_S = 2.0  # /health/ready asks Ray's controller at most this often per replica


def application(load_kwargs: dict, model: list[str], app_kwargs: dict, replicas: int = 1,
                autoscale: tuple[int, int] | None = None, num_gpus: float = 0.0, num_cpus: float = 1.0):
    """A bound Ray Serve application serving engine.serve.http's app; the model loads on each replica.
    app_kwargs: create_app's options (max_batch, max_queue, timeout_s, policy, limits, api_keys, ...)."""
    try:
        from ray import serve
    except ImportError as exc:
        raise EngineError("--ray needs Ray Serve: pip install 'cascade-engine[ray]'") from exc
    if replicas < 1 or num_gpus < 0:
        raise InvalidRequestError(f"replicas must be >= 1 and num_gpus >= 0, got {replicas} and {num_gpus}")
    max_batch = app_kwargs.get("max_batch", DEFAULT_MAX_BATCH)
    options = {"ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus},
               # Ray's own admission bound per replica: our scheduler's queue size. Requests wait in that queue
               # until the next step admits them, so all of a replica's ongoing requests can be waiting at
               # once (all arrived during one long U-Net call); a larger bound let Ray send a replica more than
               # its queue holds, and that replica answered 503 while Ray still held capacity elsewhere.
               "max_ongoing_requests": app_kwargs.get("max_queue", DEFAULT_MAX_QUEUE),
               "health_check_period_s": HEALTH_CHECK_PERIOD_S}
    if autoscale is not None:
        low, high = autoscale
        if not 1 <= low <= high:
            raise InvalidRequestError(f"--autoscale needs 1 <= MIN <= MAX, got {low}:{high}")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": max_batch}
    else:
        options["num_replicas"] = replicas

    @serve.deployment(name=DEPLOYMENT_NAME, **options)
    @serve.ingress()
    class CascadeEngine:
        def __init__(self):
            # Runs on the replica: the model is loaded there, never pickled from the driver. An exception here
            # fails the replica's start, which Ray reports (and retries).
            self.engine_app = replica_app(load_kwargs, model, app_kwargs)

        def __serve_build_asgi_app__(self):
            return self.engine_app

        def check_health(self):
            fault = self.engine_app.state.service.fault()
            if fault is not None:
                raise RuntimeError(fault)

    return CascadeEngine.bind()


def replica_app(load_kwargs: dict, model: list[str], app_kwargs: dict):
    """The replica's app: its model loaded and warmed up, its metrics also recorded through Ray's, its readiness
    the deployment's, and every answer naming the replica."""
    from ray import serve


    pipeline = load(*model, **load_kwargs)
    caching = served_caching(pipeline, app_kwargs.get("request_defaults") or {})
    warm_up(pipeline, app_kwargs.get("max_batch", DEFAULT_MAX_BATCH), caching)  # every row bucket, before Ray routes
    context = serve.get_replica_context()
    app = create_app(pipeline, warmup=False, readiness=DeploymentReadiness(context.app_name), **app_kwargs)
    app.state.service.metrics.sinks.append(RayMetrics())
    app.add_middleware(ReplicaHeader, replica=context.replica_id.unique_id)
    return app


class DeploymentReadiness:
    """Why the deployment is not ready (its application not RUNNING), or None; Ray's answer cached briefly."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self._lock = threading.Lock()
        self._answer: tuple[float, str | None] = (float("-inf"), None)

    def __call__(self) -> str | None:
        with self._lock:
            asked, reason = self._answer
            if time.monotonic() - asked > STATUS_TTL_S:
                reason = self._ask()
                self._answer = (time.monotonic(), reason)
            return reason

    def _ask(self) -> str | None:
        from ray import serve

        status = serve.status().applications.get(self.app_name)
        if status is None:
            return f"Ray Serve has no application {self.app_name!r}"
        if status.status.value == "RUNNING":
            return None
        deployments = "; ".join(f"{name}: {d.status.value} {d.replica_states} {d.message}".strip()
                                for name, d in status.deployments.items())
        return f"the deployment is {status.status.value}: {deployments or status.message}"


class RayMetrics:
    """The service's counts through ray.serve.metrics: Ray tags them with the application, deployment and replica
    and exports them from every node (as ray_engine_*), so one scrape of Ray's metrics sees every replica."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self._requests = Counter("engine_requests", description="Generation requests by outcome.",
                                 tag_keys=("status",))
        self._images = Counter("engine_images", description="Images generated.")
        self._queue = Histogram("engine_queue_seconds", description="Time from submission to the first stage.",
                                boundaries=list(SECONDS_BUCKETS))
        self._compute = Histogram("engine_compute_seconds", description="Time from the first stage to the result.",
                                  boundaries=list(SECONDS_BUCKETS))
        self._batch = Histogram("engine_batch_images", description="Images per U-Net call.",
                                boundaries=list(BATCH_BUCKETS))

    def request(self, status: str) -> None:
        self._requests.inc(tags={"status": status})

    def batch(self, stage: str, images: int, rows: int) -> None:
        self._batch.observe(images)

    def job_finished(self, job, status: str) -> None:
        self._requests.inc(tags={"status": status})
        if job.admitted is not None:
            self._queue.observe(job.admitted - job.submitted)
            if status == "ok":
                self._compute.observe(time.monotonic() - job.admitted)
        if status == "ok":
            self._images.inc(job.images)


class ReplicaHeader:
    """ASGI middleware: every HTTP answer carries X-Replica-ID, the Ray replica that gave it."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-replica-id", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)
        await self.app(scope, receive, send_with_header)


def run(app, host: str, port: int, address: str | None = None, blocking: bool = True) -> None:
    """Start Ray (local, or the cluster at `address`), Serve's HTTP proxy on host:port, and the app. A deployment
    whose replicas cannot start (a model that does not load) is an EngineError with Ray's reason."""
    import ray
    from ray import serve

    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(app, name=DEPLOYMENT_NAME, route_prefix="/", blocking=blocking)
    except RuntimeError as exc:  # Ray's DEPLOY_FAILED; the replicas' own error is in the deployment's message
        raise EngineError(f"the Ray Serve deployment failed to start: {_replica_error()}") from exc


def _replica_error() -> str:
    """The last line of the traceback Ray keeps for the deployment's failed replicas (the error itself)."""
    from ray import serve

    status = serve.status().applications.get(DEPLOYMENT_NAME)
    messages = [d.message for d in status.deployments.values() if d.message] if status is not None else []
    lines = [line.strip() for line in "\n".join(messages).splitlines() if line.strip()]
    return lines[-1] if lines else "Ray gave no reason; see the replicas' logs"
