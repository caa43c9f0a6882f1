"""The engine's error types: one for bad models on disk, one for bad requests, one for bad numbers.

Every error names what went wrong and, where there is one, the fix. All derive from EngineError so an
embedding service can catch ours apart from everything else.
"""

from __future__ import annotations

from pathlib import Path


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelError(EngineError):
    """A model directory is missing, incomplete, corrupt or does not fit where it is used."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # pickled whole, as across processes (a Ray worker's error reaching the driver)
        return type(self), (self.path, self.problem)


class InvalidRequestError(EngineError, ValueError):
    """A generation request or option is out of range or of the wrong type (raised before any model work)."""


class NumericalError(EngineError):
    """A stage produced NaN or inf values."""


class QueueFullError(EngineError):
    """The serving queue is at its bound: try again later (HTTP 503 with Retry-After)."""


class ShuttingDownError(EngineError):
    """The service is shutting down and its drain time ran out before this request finished (HTTP 503)."""


class RequestTimeoutError(EngineError, TimeoutError):
    """A served request ran past its deadline; it was dropped at a step boundary (HTTP 504)."""
