"""The service's defaults and bounds, one home for each: the CLI's flags, the HTTP app, Ray replicas and the
scheduler read them here. No web imports: the CLI reads its defaults without the [serve] extra installed.
(Images per U-Net call, DEFAULT_MAX_BATCH, is engine.options': batch jobs and TensorRT profiles use it too.)"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

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


# A request's cost, per served model: steps per stage up to this many times the most any stage takes by default
# (at least MIN_MAX_STEPS), images per request up to the scheduler's max_batch, pixels up to those images at the
# model's output size. An operator lowers them (flags, variables); None below means "fit the served model".
MAX_STEPS_FACTOR = 4
MIN_MAX_STEPS = 100


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the service. Defaults here; flags, or CASCADE_ENGINE_<NAME> variables."""

    max_body_bytes: int = 1 << 20  # a body with the longest prompts and per-stage lists is a few kB
    max_upload_bytes: int = 16 << 20  # an edit's body (/v1/images/edits): its picture and mask files
    max_prompt_chars: int = 4000  # per prompt: 77 tokens are a few hundred characters; the rest is truncated
    body_timeout_s: float = 10.0  # to read the whole body: a 1 MiB body takes under a second on a working link
    max_steps: int | None = None  # denoising steps in any one stage (None: fit the model, see for_model)
    max_images: int | None = None  # images per request, prompts x n (None: the scheduler's max_batch)
    max_pixels_per_request: int | None = None  # images x output pixels (None: max_images at the model's size)

    @classmethod
    def from_environment(cls) -> "Limits":
        values = {}
        for field_ in fields(cls):
            kind = float if field_.name.endswith("_s") else int
            variable = f"CASCADE_ENGINE_{field_.name.upper()}"
            text = os.environ.get(variable)
            if text is not None:
                try:
                    value = kind(text)
                except ValueError:
                    value = 0
                if not value > 0 or value == float("inf"):
                    raise InvalidRequestError(f"{variable} must be a positive {kind.__name__}, got {text!r}")
                values[field_.name] = value
        return cls(**values)

    def check(self, max_batch: int) -> None:
        """InvalidRequestError for limits that cannot hold with max_batch, before any model is loaded: max_images
        above it (the scheduler makes one request's images in one call)."""
        if self.max_images is not None and self.max_images > max_batch:
            raise InvalidRequestError(f"max_images ({self.max_images}) cannot exceed max_batch ({max_batch}): one "
                                      "request's images run in one U-Net call; raise --max-batch too")

    def for_model(self, default_steps: list[int], image_size: int | None, max_batch: int) -> "Limits":
        """These limits with the model-dependent ones that are unset filled in (see MAX_STEPS_FACTOR), for a
        model whose stages take `default_steps` by default and whose images are `image_size` pixels a side
        (None: the input image decides); InvalidRequestError as check() gives it."""
        self.check(max_batch)
        max_images = self.max_images or max_batch
        pixels = self.max_pixels_per_request
        if pixels is None and image_size is not None:
            pixels = max_images * image_size * image_size
        return replace(self, max_steps=self.max_steps or max(MIN_MAX_STEPS, MAX_STEPS_FACTOR * max(default_steps)),
                       max_images=max_images, max_pixels_per_request=pixels)
