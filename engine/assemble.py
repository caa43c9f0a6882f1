"""The one builder of a Pipeline: stage specs (model_dir.StageSpec) + a backend's components -> Stages, Pipeline.

Every backend goes through here (loading.py for model directories and exports, export/onnx.py for the torch
modules it exports), so what a stage is (its samplers' config, its noise schedule, its defaults, its text
encoder) is decided once, whatever runs the components.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine import offload
from engine.errors import InvalidRequestError, ModelError
from engine.options import StageDefaults
from engine.pipeline import Pipeline
from engine.schedules import NoiseSchedule
from engine.stage import NO_CACHING, LatentUpscaleStage, Stage
from engine.text import NoTextEncoder, TextEncoder

log = logging.getLogger(__name__)


def build_pipeline(specs: list, components, source: str = "", notice: str | None = None,
                   presets: dict | None = None) -> Pipeline:
    """A Pipeline over `specs` (model_dir.StageSpec, cascade order) whose components come from `components`
    (backends/protocol.py's Components). presets: name -> model_dir.Preset, the model's named settings."""
    device, dtype = components.device, components.dtype
    if specs[0].text_dim is not None:  # a super-resolution stage alone, without a text encoder
        text = NoTextEncoder(device, dtype, specs[0].text_dim)
    else:
        text = None if specs[0].kind == "latent_upscaler" else _text_encoder(components, specs[0], clip=False)
    stages = []
    for spec in specs:
        defaults = stage_defaults(spec)
        noising = None if spec.noising_config is None else noise_schedule(spec.noising_config, spec.directory)
        noise_schedule(spec.scheduler_config, spec.directory)  # refuses an unusable schedule before any run
        unet = components.unet(spec)
        if spec.kind == "latent_upscaler":
            stages.append(LatentUpscaleStage(
                spec.name, unet, components.vae_decoder(spec), spec.scheduler_config, noising, device, dtype,
                text=_text_encoder(components, spec, clip=True), max_noise_level=spec.max_noise_level,
                defaults=defaults))
        else:
            stages.append(Stage(spec.name, unet, spec.scheduler_config, noising, device, dtype, defaults=defaults))
    pipeline = Pipeline(text or stages[0].text, stages, device, dtype, source=source, notice=notice,
                        run_context=components.run_context(), backend=components.backend)
    for name, preset in (presets or {}).items():
        try:
            pipeline.add_preset(name, preset.stages, preset.certified)
        except InvalidRequestError as exc:  # the model's own files are wrong: say which
            raise ModelError(source or specs[0].directory, str(exc)) from exc
        uncached = [stage.name for stage in stages
                    if stage.presets[name].cache is not None and not getattr(stage.unet, "cache_depths", 0)]
        if uncached:  # said now, not first at a request: the preset is refused until the fix
            log.warning("preset %r caches features on %s, which this backend's U-Nets cannot run: requests with it "
                        "are refused (%s)", name, ", ".join(uncached), NO_CACHING)
    mode = getattr(components, "offload", None)
    if mode is not None:  # the models wait in host memory, each on the device while it runs (offload.py)
        pipeline.offloader = offload.install(pipeline, mode)
    return pipeline


def stage_defaults(spec) -> StageDefaults:
    """The stage kind's defaults with the model's own (cascade.json "defaults") over them; ModelError names a
    bad entry."""
    try:
        return StageDefaults.for_stage(spec.kind, spec.defaults)
    except InvalidRequestError as exc:
        raise ModelError(spec.directory, f"{spec.name}'s defaults: {exc}") from exc


def noise_schedule(config: dict, where: Path) -> NoiseSchedule:
    """The noise schedule of a (model_dir-resolved) scheduler config; ModelError where it cannot be built."""
    try:
        return NoiseSchedule.from_config(config)
    except ValueError as exc:
        raise ModelError(where, str(exc)) from exc


def _text_encoder(components, spec, clip: bool) -> TextEncoder:
    tokenizer, model, dim = components.text_encoder(spec)
    runs_on = getattr(components, "text_device", components.device) if not clip else components.device
    return TextEncoder(tokenizer, model, runs_on, output_dtype=components.dtype, dim=dim, clip=clip,
                       output_device=components.device)
