"""Serving: a step-level batching scheduler over a Pipeline (usable without any server)."""

from engine.serve.scheduler import BatchingScheduler, Job

__all__ = ["BatchingScheduler", "Job"]
