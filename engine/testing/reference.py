"""diffusers' own pipelines over the same model files: the oracle for parity tests and benchmarks.

`reference_cascade(dir)` builds IFPipeline + IFSuperResolutionPipeline (+ StableDiffusionUpscalePipeline when
the directory has a stage_III) from a cascade directory written in DeepFloyd's layout (`reference_stages(...)`
from the stage directories themselves); `run_reference(...)`
calls them the way the README's reproducibility contract states it ("Seeds"): one CPU generator passed to all, prompt
embeddings from stage I, each stage's raw output (output_type="pt") fed to the next. The x4 upscaler encodes
the prompts with its own CLIP encoder, one prompt per image.
"""

from __future__ import annotations

from pathlib import Path

import torch


def reference_cascade(cascade_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    root = Path(cascade_dir)
    stages = [root / name for name in ("stage_I", "stage_II", "stage_III") if (root / name).is_dir()]
    return reference_stages(*stages, dtype=dtype, device=device)


def reference_stages(stage_i: str | Path, stage_ii: str | Path, stage_iii: str | Path | None = None,
                     dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """IFPipeline + IFSuperResolutionPipeline (+ StableDiffusionUpscalePipeline) from stage directories."""
    from diffusers import UNet2DConditionModel
    from transformers import T5EncoderModel

    stage_i, stage_ii = Path(stage_i), Path(stage_ii)
    first, second = if_pipes(stage_i, stage_ii, T5EncoderModel.from_pretrained(stage_i / "text_encoder", dtype=dtype),
                             UNet2DConditionModel.from_pretrained(stage_i / "unet", torch_dtype=dtype),
                             UNet2DConditionModel.from_pretrained(stage_ii / "unet", torch_dtype=dtype))
    pipes = [first, second]
    if stage_iii is not None:
        pipes.append(reference_upscaler(stage_iii, dtype))
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
    return tuple(pipes)


def if_pipes(stage_i: Path, stage_ii: Path, text_encoder, unet_i, unet_ii, device: str | None = None):
    """IFPipeline + IFSuperResolutionPipeline around given modules, tokenizer and schedulers read from the stage
    directories (no safety checker or watermarker: the engine's parity is with the images before them)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline
    from transformers import AutoTokenizer

    common = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    tokenizer = AutoTokenizer.from_pretrained(stage_i / "tokenizer", trust_remote_code=False)
    first = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                       unet=unet_i, scheduler=DDPMScheduler.from_pretrained(stage_i / "scheduler"), **common)
    second = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=unet_ii,
        scheduler=DDPMScheduler.from_pretrained(stage_ii / "scheduler"),
        image_noising_scheduler=DDPMScheduler.from_pretrained(stage_ii / "image_noising_scheduler"), **common)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
        if device is not None:
            pipe.to(device)
    return first, second


def reference_upscaler(stage_dir: str | Path, dtype: torch.dtype = torch.float32):
    """StableDiffusionUpscalePipeline over an x4-upscaler directory."""
    import json

    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

    stage = Path(stage_dir)
    max_noise_level = json.loads((stage / "model_index.json").read_text()).get("max_noise_level", 350)
    return StableDiffusionUpscalePipeline(
        vae=AutoencoderKL.from_pretrained(stage / "vae", torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(stage / "text_encoder", dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(stage / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(stage / "unet", torch_dtype=dtype),
        low_res_scheduler=DDPMScheduler.from_pretrained(stage / "low_res_scheduler"),
        scheduler=DDIMScheduler.from_pretrained(stage / "scheduler"),
        max_noise_level=max_noise_level)


def swap_scheduler(scheduler, cls):
    """`cls` built from an IF scheduler's config the way IF's pipelines can run it."""
    from diffusers import DDIMScheduler

    if cls is not DDIMScheduler:
        return cls.from_config(scheduler.config)  # DPM-Solver drops IF's variance channels itself
    # DDIM has no variance of its own; IF's pipelines strip the variance channels only when the scheduler
    # config does not claim a learned variance, so DDIM gets IF's config with variance_type cleared.
    ddim = DDIMScheduler.from_config({k: v for k, v in scheduler.config.items() if k != "variance_type"})
    ddim.register_to_config(variance_type=None)
    return ddim


def run_reference(pipes, prompts, seed, steps, guidance, n=1, negative=None, noise_level=250, output_type="np"):
    """Stage I, stage II (and the x4 upscaler) with one CPU generator.

    `steps` and `guidance` per stage; `steps` an int or an explicit timestep list; `noise_level` one value per
    stage after the first (or one int for stage II).
    """
    first, second = pipes[:2]
    noise_levels = (noise_level,) if isinstance(noise_level, int) else tuple(noise_level)
    # One CPU generator from the seed, or a list of generators given as `seed` (one per image, diffusers' way).
    generator = seed if isinstance(seed, list) else torch.Generator("cpu").manual_seed(seed)
    embeds, negative_embeds = first.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                  num_images_per_prompt=n, negative_prompt=negative)

    def step_args(s):
        return {"timesteps": list(s)} if isinstance(s, (list, tuple)) else {"num_inference_steps": s}

    low = first(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, generator=generator,
                guidance_scale=guidance[0], output_type="pt", **step_args(steps[0])).images
    if len(pipes) == 2:
        return second(image=low, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, generator=generator,
                      guidance_scale=guidance[1], noise_level=noise_levels[0], output_type=output_type,
                      **step_args(steps[1])).images
    mid = second(image=low, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, generator=generator,
                 guidance_scale=guidance[1], noise_level=noise_levels[0], output_type="pt",
                 **step_args(steps[1])).images
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    per_image = [p for p in prompts for _ in range(n)]  # the images' order: each prompt's n images together
    negatives = None
    if negative is not None:
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        negatives = [p for p in negative for _ in range(n)]
    return pipes[2](prompt=per_image, negative_prompt=negatives, image=mid, generator=generator,
                    guidance_scale=guidance[2], noise_level=noise_levels[1], num_inference_steps=steps[2],
                    output_type=output_type).images


def reference_edit(pipes, masked: bool):
    """diffusers' IF edit pipelines over the same components as `pipes` (reference_cascade's first two):
    IFImg2ImgPipeline + IFImg2ImgSuperResolutionPipeline, or with `masked` IFInpaintingPipeline +
    IFInpaintingSuperResolutionPipeline."""
    from diffusers import (IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline, IFInpaintingPipeline,
                           IFInpaintingSuperResolutionPipeline)

    classes = ((IFInpaintingPipeline, IFInpaintingSuperResolutionPipeline) if masked
               else (IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline))
    edits = tuple(cls(**pipe.components, requires_safety_checker=False) for cls, pipe in zip(classes, pipes))
    for pipe in edits:
        pipe.set_progress_bar_config(disable=True)
    return edits


def run_reference_edit(pipes, prompts, image, seed, steps, guidance, strength, mask=None, n=1, noise_level=250,
                       output_type="np"):
    """An edit through diffusers' two IF edit pipelines (reference_edit) with one CPU generator, as their model
    card chains them: stage I edits `image`, stage II takes its output and the same picture as original_image
    (and the same mask). `steps`, `guidance` and `strength` per stage."""
    first, second = pipes
    generator = torch.Generator("cpu").manual_seed(seed)
    embeds, negative_embeds = first.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                  num_images_per_prompt=n)
    masked = {} if mask is None else {"mask_image": mask}
    low = first(image=image, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, generator=generator,
                guidance_scale=guidance[0], num_inference_steps=steps[0], strength=strength[0], output_type="pt",
                **masked).images
    return second(image=low, original_image=image, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
                  generator=generator, guidance_scale=guidance[1], num_inference_steps=steps[1],
                  strength=strength[1], noise_level=noise_level, output_type=output_type, **masked).images
