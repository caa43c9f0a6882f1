"""Cascaded pixel-space text-to-image diffusion (DeepFloyd IF / Imagen family), fast and faithful to diffusers.

    import engine
    images = engine.generate("a red circle on a blue background", seed=0)   # packaged default model
    pipe = engine.load("/models/IF-I-XL-v1.0", "/models/IF-II-L-v1.0")     # your own cascade
    images = pipe.generate("a photo of a corgi", seed=0)
    engine.batch("prompts.csv", "out/")                                    # every row, batched, resumable
    out = pipe("a photo of a corgi", num_inference_steps=(27, 27), guidance_scale=7.0, generator=g)  # diffusers' names
"""

from __future__ import annotations

import functools
import importlib

from engine.errors import EngineError, InvalidRequestError, ModelError, NumericalError
from engine.model_dir import DEFAULT_MODEL, packaged_models
from engine.options import GenerateRequest, request_from_call
from engine.pipeline import Generation, Pipeline
from engine.version import __version__

__all__ = ["generate", "batch", "load", "Pipeline", "Generation", "GenerateRequest", "EngineError", "ModelError",
           "InvalidRequestError", "NumericalError", "DEFAULT_MODEL", "packaged_models", "__version__"]


# Imported when first asked for: engine.loading and engine.offline bring the backends, assembly and the
# scheduler, which `import engine` (and export/, which imports engine's submodules) need not pay for. The
# engine reaches export/ only by name, through the exported backends' hooks (backends.BACKENDS).
_LAZY = {"load": "engine.loading", "batch": "engine.offline"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


@functools.lru_cache(maxsize=1)
def default_pipeline() -> Pipeline:
    """The packaged default model on the best available device, loaded once per process."""
    return __getattr__("load")(DEFAULT_MODEL)


def generate(prompt, **options):
    """Images for `prompt` from the packaged default model; options as in `Pipeline.generate`."""
    on_step = options.pop("on_step", None)
    request = request_from_call(prompt, options)  # bad input fails before the model is loaded
    return default_pipeline().run(request, on_step=on_step).images
