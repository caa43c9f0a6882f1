"""diffusers' own IF pipelines over the same model files: the oracle for parity tests and benchmarks.

`reference_cascade(dir)` builds IFPipeline + IFSuperResolutionPipeline from a cascade directory written in
DeepFloyd's layout (`reference_stages(stage_i, stage_ii)` from two stage directories); `run_reference(...)` calls them the way DESIGN.md's reproducibility contract defines it:
one CPU generator passed to both, prompt embeddings from stage I, stage I's raw output fed to stage II.
"""

from __future__ import annotations

from pathlib import Path

import torch


def reference_cascade(cascade_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    return reference_stages(Path(cascade_dir) / "stage_I", Path(cascade_dir) / "stage_II", dtype, device)


def reference_stages(stage_i: str | Path, stage_ii: str | Path, dtype: torch.dtype = torch.float32,
                     device: str = "cpu"):
    """IFPipeline + IFSuperResolutionPipeline from two stage directories (DeepFloyd's layout)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, T5EncoderModel

    stage_i, stage_ii = Path(stage_i), Path(stage_ii)
    common = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    first = IFPipeline(
        tokenizer=AutoTokenizer.from_pretrained(stage_i / "tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(stage_i / "text_encoder", dtype=dtype),
        unet=UNet2DConditionModel.from_pretrained(stage_i / "unet", torch_dtype=dtype),
        scheduler=DDPMScheduler.from_pretrained(stage_i / "scheduler"), **common)
    second = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None,
        unet=UNet2DConditionModel.from_pretrained(stage_ii / "unet", torch_dtype=dtype),
        scheduler=DDPMScheduler.from_pretrained(stage_ii / "scheduler"),
        image_noising_scheduler=DDPMScheduler.from_pretrained(stage_ii / "image_noising_scheduler"), **common)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
    return first, second


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
    """Stage I then stage II with one CPU generator. `steps` per stage: an int or an explicit timestep list."""
    first, second = pipes
    generator = torch.Generator("cpu").manual_seed(seed)
    embeds, negative_embeds = first.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                  num_images_per_prompt=n, negative_prompt=negative)

    def step_args(s):
        return {"timesteps": list(s)} if isinstance(s, (list, tuple)) else {"num_inference_steps": s}

    low = first(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, generator=generator,
                guidance_scale=guidance[0], output_type="pt", **step_args(steps[0])).images
    return second(image=low, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, generator=generator,
                  guidance_scale=guidance[1], noise_level=noise_level, output_type=output_type,
                  **step_args(steps[1])).images
