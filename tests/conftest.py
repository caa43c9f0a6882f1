"""Shared fixtures: tiny random IF-architecture cascades written to disk, and diffusers' reference pipelines."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, T5EncoderModel

from engine.random_models import TinyCascadeSpec, write_if_cascade


@pytest.fixture(scope="session")
def cascade_dir(tmp_path_factory):
    """A two-stage tiny IF cascade (16px base -> 32px super-resolution) with cascade.json."""
    return write_if_cascade(tmp_path_factory.mktemp("cascade"), TinyCascadeSpec(), seed=0)


@pytest.fixture(scope="session")
def engine_pipe(cascade_dir):
    import engine

    return engine.load(cascade_dir, device="cpu")


@pytest.fixture(scope="session")
def reference(cascade_dir):
    """diffusers' IF pipelines over the same files: the oracle every parity test compares against."""
    stage_i, stage_ii = cascade_dir / "stage_I", cascade_dir / "stage_II"
    tokenizer = AutoTokenizer.from_pretrained(stage_i / "tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(stage_i / "text_encoder")
    common = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    first = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                       unet=UNet2DConditionModel.from_pretrained(stage_i / "unet"),
                       scheduler=DDPMScheduler.from_pretrained(stage_i / "scheduler"), **common)
    second = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=UNet2DConditionModel.from_pretrained(stage_ii / "unet"),
        scheduler=DDPMScheduler.from_pretrained(stage_ii / "scheduler"),
        image_noising_scheduler=DDPMScheduler.from_pretrained(stage_ii / "image_noising_scheduler"), **common)
    for p in (first, second):
        p.set_progress_bar_config(disable=True)
    return first, second


def _swap_scheduler(scheduler, cls):
    if cls is not DDIMScheduler:
        return cls.from_config(scheduler.config)  # DPM-Solver drops IF's variance channels itself
    # DDIM has no variance of its own; IF's pipelines strip the variance channels only when the scheduler
    # config does not claim a learned variance, so DDIM gets IF's config with variance_type cleared.
    config = {k: v for k, v in scheduler.config.items() if k != "variance_type"}
    ddim = DDIMScheduler.from_config(config)
    ddim.register_to_config(variance_type=None)
    return ddim


def diffusers_cascade(reference, prompts, seed, steps, guidance, n=1, negative=None, noise_level=250,
                      scheduler_cls=None):
    """IFPipeline then IFSuperResolutionPipeline with one CPU generator, as DESIGN.md's anchor defines it.

    `steps` per stage: an int (num_inference_steps) or a list (explicit timesteps). Returns np (B, H, W, 3).
    """
    first, second = reference
    if scheduler_cls is not None:
        first.scheduler, second.scheduler = (_swap_scheduler(p.scheduler, scheduler_cls) for p in (first, second))
    generator = torch.Generator("cpu").manual_seed(seed)
    embeds, negative_embeds = first.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                  num_images_per_prompt=n, negative_prompt=negative)

    def step_args(s):
        return {"timesteps": s} if isinstance(s, list) else {"num_inference_steps": s}

    low = first(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, generator=generator,
                guidance_scale=guidance[0], output_type="pt", **step_args(steps[0])).images
    high = second(image=low, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, generator=generator,
                  guidance_scale=guidance[1], noise_level=noise_level, output_type="np",
                  **step_args(steps[1])).images
    return high
