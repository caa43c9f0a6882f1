"""diffusers' pipeline classes as doors to the engine, so that code written for diffusers' DeepFloyd IF pipelines
runs with its imports changed (examples/deepfloyd_model_card.py is DeepFloyd's model card so):

    from engine.diffusers import DiffusionPipeline, IFPipeline, IFSuperResolutionPipeline, pt_to_pil
    (and IFImg2ImgPipeline, IFInpaintingPipeline and their SuperResolution twins, for the edits)
    stage_1 = IFPipeline.from_pretrained("DeepFloyd/IF-I-XL-v1.0", variant="fp16", torch_dtype=torch.float16)
    stage_2 = IFSuperResolutionPipeline.from_pretrained("DeepFloyd/IF-II-L-v1.0", text_encoder=None, ...)

Each `from_pretrained` is `engine.load` of one stage (a directory, or a hub id from the local Hugging Face cache)
and returns the engine's Pipeline, whose call takes diffusers' arguments (README, "Coming from diffusers"). The
stages chained as the model card chains them, with one generator, give the cascade's images.
"""

from __future__ import annotations

from engine.errors import InvalidRequestError
from engine.images import from_model_range
from engine.loading import load
from engine.pipeline import Pipeline

_NOT_GIVEN = object()
# Components diffusers' IF pipelines take that the engine does not run: None (or the values another pipe's
# attributes give, which are None here too) is accepted.
UNRUN_COMPONENTS = ("safety_checker", "feature_extractor", "watermarker")


class DiffusionPipeline:
    """diffusers' DiffusionPipeline.from_pretrained: any IF stage or the x4 upscaler, whichever the directory is."""

    stage_kind: str | None = None  # what the class loads ("base", "super_resolution", "latent_upscaler"); None: any

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, variant=None, revision=None,
                        text_encoder=_NOT_GIVEN, **components) -> Pipeline:
        """The engine's Pipeline for one stage. text_encoder=None loads it without its text encoder (it then
        takes prompt_embeds, as diffusers' does); safety_checker, feature_extractor and watermarker take None
        (none runs). Other diffusers arguments are refused by name."""
        for name, value in components.items():
            if name not in UNRUN_COMPONENTS:
                raise InvalidRequestError(f"from_pretrained's {name}= is not supported here (the engine takes "
                                          "torch_dtype=, variant=, revision=, text_encoder=None)")
            if value is not None:
                raise InvalidRequestError(f"{name}= takes None: the engine runs no {name}")
        if text_encoder is not _NOT_GIVEN and text_encoder is not None:
            raise InvalidRequestError("text_encoder= takes None (not loaded): the engine loads a stage's own")
        pipe = load(pretrained_model_name_or_path, torch_dtype=torch_dtype, variant=variant, revision=revision,
                    text_encoder=text_encoder is _NOT_GIVEN)
        kind = pipe.stages[0].kind
        if cls.stage_kind is not None and (kind != cls.stage_kind or len(pipe.stages) > 1):
            raise InvalidRequestError(f"{cls.__name__} loads one {cls.stage_kind} stage; "
                                      f"{pretrained_model_name_or_path} holds {len(pipe.stages)} stage(s), the "
                                      f"first a {kind} stage: use DiffusionPipeline or engine.load")
        return pipe


    @classmethod
    def from_pipe(cls, pipeline: Pipeline, **unused) -> Pipeline:
        """diffusers' from_pipe (IFImg2ImgPipeline.from_pipe(stage_1)): the same Pipeline, which runs every IF
        job itself (an edit is its call with image=); checked to be the stage kind the class names."""
        if unused:
            raise InvalidRequestError(f"from_pipe's {sorted(unused)[0]}= is not supported here: the pipeline is "
                                      "used as it is")
        if not isinstance(pipeline, Pipeline):
            raise InvalidRequestError(f"from_pipe takes an engine Pipeline, got {type(pipeline).__name__}")
        if cls.stage_kind is not None and pipeline.stages[0].kind != cls.stage_kind:
            raise InvalidRequestError(f"{cls.__name__} runs a {cls.stage_kind} stage; this pipeline starts with "
                                      f"{pipeline.stages[0].kind}")
        return pipeline


# One Pipeline class does every job: text-to-image, and with image=/mask_image=/strength= the edits. The edit
# classes load the same, with the engine's defaults (the model's), not each diffusers class's own (its
# IFImg2ImgPipeline guides at 10, its IFInpaintingSuperResolutionPipeline augments at noise_level 0): pass
# guidance_scale= and noise_level= to match those.
class IFPipeline(DiffusionPipeline):
    stage_kind = "base"


class IFImg2ImgPipeline(IFPipeline):
    pass


class IFInpaintingPipeline(IFPipeline):
    pass


class IFSuperResolutionPipeline(DiffusionPipeline):
    stage_kind = "super_resolution"


class IFImg2ImgSuperResolutionPipeline(IFSuperResolutionPipeline):
    pass


class IFInpaintingSuperResolutionPipeline(IFSuperResolutionPipeline):
    pass


class StableDiffusionUpscalePipeline(DiffusionPipeline):
    stage_kind = "latent_upscaler"


def pt_to_pil(images):
    """diffusers.utils.pt_to_pil: IF's output_type="pt" images (B, 3, H, W), about [-1, 1], as PIL images."""
    return from_model_range(images, "pil")
