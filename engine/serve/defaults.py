"""The service's defaults and bounds, one home for each: the CLI's flags, the HTTP app, Ray replicas and the
scheduler read them here. No web imports: the CLI reads its defaults without the [serve] extra installed.
(Images per U-Net call, DEFAULT_MAX_BATCH, is engine.options': batch jobs and TensorRT profiles use it too.)"""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.errors import InvalidRequestError

DEFAULT_HOST = "127.0.0.1"  # loopback: nothing listens beyond this machine unless the user says so
DEFAULT_PORT = 8000
DEFAULT_TIMEOUT_S = 300.0  # a request's longest life, queue time included; a body's "timeout" may shorten it
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # after SIGTERM, how long the requests in flight get to finish
DEFAULT_MAX_CONNECTIONS = 256  # open connections (and their requests) before uvicorn answers 503
DEFAULT_KEEP_ALIVE_S = 5.0  # an idle keep-alive connection's life
DEFAULT_HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive whole within this (slow clients get a 408)
DEFAULT_MAX_QUEUE = 32  # requests waiting for admission
# Admission policies, for comparing (bench/serve_load.py): "step" admits at every step boundary (the point of
# this module); "request" admits only when the cascade is idle, then as many waiting requests as fit, which
# run to the end together (classic dynamic batching); "none" runs one request at a time.
POLICIES = ("step", "request", "none")
DEFAULT_POLICY = POLICIES[0]


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the service. Defaults here; flags, or CASCADE_ENGINE_<NAME> variables."""

    max_body_bytes: int = 1 << 20  # a body with the longest prompts and per-stage lists is a few kB
    max_prompt_chars: int = 4000  # per prompt: 77 tokens are a few hundred characters; the rest is truncated
    body_timeout_s: float = 10.0  # to read the whole body: a 1 MiB body takes under a second on a working link

    @classmethod
    def from_environment(cls) -> "Limits":
        values = {}
        for name, kind in (("max_body_bytes", int), ("max_prompt_chars", int), ("body_timeout_s", float)):
            variable = f"CASCADE_ENGINE_{name.upper()}"
            text = os.environ.get(variable)
            if text is not None:
                try:
                    value = kind(text)
                except ValueError:
                    value = 0
                if not value > 0 or value == float("inf"):
                    raise InvalidRequestError(f"{variable} must be a positive {kind.__name__}, got {text!r}")
                values[name] = value
        return cls(**values)
