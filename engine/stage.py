"""One diffusion stage of the cascade: its conditioning and the denoising loop with batched guidance.

A base stage starts from noise at its U-Net's sample size. A super-resolution stage also takes the previous
stage's image, exactly as DeepFloyd IF-II does: bilinear upsample (align_corners=True) to its size, noise
augmentation at `noise_level` through the image-noising schedule, concatenation with x_t into the 6-channel
input, and `class_labels = noise_level`.

Randomness follows diffusers' order on one CPU generator (x_T, then the augmentation noise, then one draw per
noisy step), all drawn before the loop so the loop itself never touches the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine.errors import NumericalError
from engine.options import StageSettings
from engine.samplers import SCHEDULER_CLASSES, build_sampler
from engine.schedules import NoiseSchedule

IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning for one request, already repeated per image."""

    cond: torch.Tensor  # (B, 77, D) prompt embeddings
    uncond: torch.Tensor | None  # (B, 77, D) negative/empty-prompt embeddings; None when no stage guides


class Stage:
    def __init__(self, name: str, unet, scheduler_config: Mapping[str, Any],
                 noising: NoiseSchedule | None, device: torch.device, dtype: torch.dtype):
        self.name = name
        self.unet = unet  # a backend U-Net: unet(sample, timestep, encoder_hidden_states, class_labels)
        self.scheduler_config = dict(scheduler_config)
        self.default_sampler = SCHEDULER_CLASSES[self.scheduler_config.get("_class_name", "DDPMScheduler")]
        self.noising = noising  # the image-noising schedule of a super-resolution stage; None for a base stage
        self.device = device
        self.dtype = dtype
        self.size = unet.sample_size
        self.learned_variance = unet.out_channels == 2 * IMAGE_CHANNELS

    @property
    def kind(self) -> str:
        return "base" if self.noising is None else "super_resolution"

    def _draw(self, generator: torch.Generator, shape) -> torch.Tensor:
        # On the CPU generator in the stage dtype, as diffusers' randn_tensor does, then moved.
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)

    @torch.inference_mode()
    def run(self, text: Conditioning, previous: torch.Tensor | None, settings: StageSettings,
            generator: torch.Generator, progress: bool = True) -> torch.Tensor:
        """Denoise one batch; returns x_0 as float32 (B, 3, size, size), unclamped (about [-1, 1])."""
        sampler = build_sampler(settings.sampler or self.default_sampler, self.scheduler_config,
                                settings.timesteps, self.device)
        batch = text.cond.shape[0]
        shape = (batch, IMAGE_CHANNELS, self.size, self.size)
        x = self._draw(generator, shape).float() * sampler.init_noise_sigma  # (B, 3, H, W) float32

        guided = settings.guidance > 1.0 and text.uncond is not None
        embeddings = torch.cat([text.uncond, text.cond]) if guided else text.cond  # (2B or B, 77, D)
        copies = 2 if guided else 1

        low_res = class_labels = None
        if self.noising is not None:
            low_res = self._augmented_low_res(previous, settings.noise_level, generator)  # (B, 3, H, W)
            low_res = low_res.repeat(copies, 1, 1, 1)
            class_labels = torch.full((copies * batch,), settings.noise_level, device=self.device)

        noise = [self._draw(generator, shape) if noisy else None for noisy in sampler.noise_steps]
        sampler.start(x)
        for i in tqdm(range(len(sampler)), desc=self.name, disable=not progress, leave=False):
            model_in = x.to(self.dtype)
            if low_res is not None:
                model_in = torch.cat([model_in.repeat(copies, 1, 1, 1), low_res], dim=1)  # (2B, 6, H, W)
            elif guided:
                model_in = model_in.repeat(2, 1, 1, 1)
            out = self.unet(model_in, sampler.timesteps[i], embeddings, class_labels).float()
            eps, variance = self._guide(out, settings.guidance if guided else None)
            x = sampler.step(i, eps, variance, x, noise[i])
        if not torch.isfinite(x).all():
            raise NumericalError(
                f"{self.name} produced NaN or inf values; the likely cause is float16 overflow in the U-Net: "
                "load with dtype='bfloat16' or 'float32'")
        return x

    def _augmented_low_res(self, previous: torch.Tensor, noise_level: int, generator: torch.Generator):
        image = previous.to(self.dtype)
        up = F.interpolate(image, (self.size, self.size), mode="bilinear", align_corners=True)
        noise = self._draw(generator, up.shape)
        acp = self.noising.alphas_cumprod.to(device=self.device, dtype=up.dtype)[noise_level]
        return acp**0.5 * up + (1 - acp) ** 0.5 * noise

    def _guide(self, out: torch.Tensor, guidance: float | None):
        """Split (and guide) the U-Net output: eps (B, 3, H, W) and the variance channels (B, 3, H, W) or None.

        With guidance the batch is [uncond; cond]: guidance moves eps, the variance comes from the cond half.
        """
        if guidance is not None:
            uncond, cond = out.chunk(2)
            eps = uncond[:, :IMAGE_CHANNELS] + guidance * (cond[:, :IMAGE_CHANNELS] - uncond[:, :IMAGE_CHANNELS])
            out = cond
        else:
            eps = out[:, :IMAGE_CHANNELS]
        variance = out[:, IMAGE_CHANNELS:] if self.learned_variance else None
        return eps, variance


def timed(device: torch.device, fn, *args):
    """Run fn(*args); return (result, seconds), synchronising the device once at the end."""
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start
