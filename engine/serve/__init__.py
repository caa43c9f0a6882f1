"""Serving: a step-level batching scheduler over a Pipeline (usable without any server), and the HTTP app
over it (engine.serve.http, needs the [serve] extra)."""

from engine.serve.scheduler import BatchingScheduler, Job

__all__ = ["BatchingScheduler", "Job"]
