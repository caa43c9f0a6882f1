"""The same HTTP app as a Ray Serve deployment: replicas (each with its own model and step-level scheduler),
`num_gpus` per replica, optional autoscaling. Ray Serve's proxy spreads requests over the replicas.

    python -m engine serve --ray [--replicas N | --autoscale MIN:MAX] [--num-gpus G] [--ray-address ADDR]

Without --ray-address a local Ray cluster starts in-process; with it (or RAY_ADDRESS set, e.g.
`ray://head-node:10001`), the deployment goes to that cluster, whose nodes need the engine installed.
"""

from __future__ import annotations

from engine.errors import EngineError, InvalidRequestError

DEPLOYMENT_NAME = "cascade-engine"


def application(load_kwargs: dict, model: list[str], max_batch: int, max_queue: int, timeout_s: float,
                policy: str, replicas: int = 1, autoscale: tuple[int, int] | None = None, num_gpus: float = 0.0):
    """A bound Ray Serve application serving engine.serve.http's app; the model loads on each replica."""
    try:
        from ray import serve
    except ImportError as exc:
        raise EngineError("--ray needs Ray Serve: pip install 'cascade-engine[ray]'") from exc
    if replicas < 1 or num_gpus < 0:
        raise InvalidRequestError(f"replicas must be >= 1 and num_gpus >= 0, got {replicas} and {num_gpus}")

    def build_app():  # runs on the replica: the model is loaded there, never pickled from the driver
        # Imported on the replica, in the Ray worker's own process (a closure that Ray pickles carries no modules).
        from engine.loading import load
        from engine.serve.http import create_app

        return create_app(lambda: load(*model, **load_kwargs), max_batch=max_batch, max_queue=max_queue,
                          timeout_s=timeout_s, policy=policy)

    options = {"ray_actor_options": {"num_gpus": num_gpus},
               # Ray's own admission bound per replica: what our scheduler runs plus what it queues.
               "max_ongoing_requests": max_batch + max_queue}
    if autoscale is not None:
        low, high = autoscale
        if not 1 <= low <= high:
            raise InvalidRequestError(f"--autoscale needs 1 <= MIN <= MAX, got {low}:{high}")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": max_batch}
    else:
        options["num_replicas"] = replicas

    @serve.deployment(name=DEPLOYMENT_NAME, **options)
    @serve.ingress(build_app)
    class CascadeEngine:
        pass

    return CascadeEngine.bind()


def run(app, host: str, port: int, address: str | None = None, blocking: bool = True) -> None:
    """Start Ray (local, or the cluster at `address`), Serve's HTTP proxy on host:port, and the app."""
    import ray
    from ray import serve

    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=DEPLOYMENT_NAME, route_prefix="/", blocking=blocking)
