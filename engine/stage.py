"""One diffusion stage of the cascade: its conditioning and the denoising loop with batched guidance.

A base stage starts from noise at its U-Net's sample size. A super-resolution stage also takes the previous
stage's image, exactly as DeepFloyd IF-II does: bilinear upsample (align_corners=True) to its size, noise
augmentation at `noise_level` through the image-noising schedule, concatenation with x_t into the 6-channel
input, and `class_labels = noise_level`.

A latent upscaler stage (`LatentUpscaleStage`, Stability's x4 upscaler) denoises latents at the previous
image's size instead: the image is noised at `noise_level` through its low-res schedule (not upsampled), joins
the latents as the 7-channel input with `class_labels = noise_level`, and a VAE decodes the result to 4x the size.

An edit (image-to-image, inpainting) runs a base or super-resolution stage as diffusers' IF edit pipelines do:
the picture, sized for the stage (images.EditInput), is noised to the timestep of the step the strength starts
at (`StageSettings.first_step`) and the steps from there run; the super-resolution stages upsample the previous
stage's image to the picture's size. With a mask, the kept part (mask 0) holds the picture: x starts as
picture where kept and noised picture where redrawn, and after each step the kept part takes back its value
from before the step (diffusers' `(1 - mask) * prev + mask * new`).

Randomness follows diffusers' order on one CPU generator, all drawn before the loop so the loop itself never
touches the host: IF stages draw x_T (an edit: the noise of its picture), then the augmentation noise, then
one draw per noisy step that runs; the x4 pipeline draws the augmentation noise before its latents.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from engine.errors import InvalidRequestError, NumericalError
from engine.executor import StageExecutor, keep_masked, update
from engine.options import StageDefaults, StageSettings
from engine.samplers import SCHEDULER_CLASSES, build_sampler
from engine.schedules import NoiseSchedule

IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning for one request, already repeated per image."""

    cond: torch.Tensor  # (B, 77, D) prompt embeddings
    uncond: torch.Tensor | None  # (B, 77, D) negative/empty-prompt embeddings; None when no stage guides

    def repeat_interleave(self, n: int) -> "Conditioning":
        """n copies of each prompt's embeddings, next to each other: one per image of that prompt."""
        return Conditioning(self.cond.repeat_interleave(n, dim=0),
                            None if self.uncond is None else self.uncond.repeat_interleave(n, dim=0))


@dataclass(frozen=True)
class Edit:
    """An edit's picture and mask for one stage's run, one row per image, on the stage's device."""

    image: torch.Tensor  # (B, 3, h, w) in [-1, 1], the stage's dtype
    mask: torch.Tensor | None  # (B, 1, h, w) float32, 1 where redrawn, 0 where kept; None: image-to-image


# Why a U-Net without `cache_depths` refuses feature caching, and the fixes (also said at load time, assemble.py)
NO_CACHING = ("feature caching (cache=) needs a U-Net with a shallow call, and this one has none: the torch backend's "
              "U-Nets (eager or fast) have one, and so do exports made by `python -m engine export` since shallow "
              "graphs were added: export the model again, or load it with backend='torch'")


class Stage:
    def __init__(self, name: str, unet, scheduler_config: Mapping[str, Any],
                 noising: NoiseSchedule | None, device: torch.device, dtype: torch.dtype, text=None,
                 defaults: StageDefaults | None = None):
        self.name = name
        self.text = text  # its own TextEncoder, or None for the cascade's first (IF-II uses IF-I's T5)
        self.unet = unet  # a backend U-Net: unet(sample, timestep, encoder_hidden_states, class_labels)
        self.scheduler_config = dict(scheduler_config)
        self.default_sampler = SCHEDULER_CLASSES[self.scheduler_config.get("_class_name", "DDPMScheduler")]
        self.noising = noising  # the image-noising schedule of a super-resolution stage; None for a base stage
        self.device = device
        self.dtype = dtype
        self.size = unet.sample_size
        self.learned_variance = unet.out_channels == 2 * IMAGE_CHANNELS
        # The model's own defaults (cascade.json "defaults", via assemble.py), else its kind's.
        self.defaults = defaults or StageDefaults.for_stage(self.kind)
        self.presets: dict[str, StageDefaults] = {}  # the model's named presets' settings for this stage
        # Its steps (executor.py): eager, or on static buffers where the U-Net says it is static.
        self.executor = StageExecutor(self)

    @property
    def kind(self) -> str:
        return "base" if self.noising is None else "super_resolution"

    @property
    def sample_channels(self) -> int:
        return IMAGE_CHANNELS

    def output_size(self, input_size: int | None) -> int | None:
        """Side of the images this stage returns, given the side of the images it receives (None: unknown)."""
        return self.size

    def validate(self, settings: StageSettings) -> None:
        """Refuse settings this stage's model cannot take (before any stage runs)."""
        cache = settings.cache
        if cache is None:
            return
        depths = getattr(self.unet, "cache_depths", 0)
        if not depths:
            raise InvalidRequestError(f"{self.name}: {NO_CACHING}, or drop cache=")
        if cache.depth > depths:
            raise InvalidRequestError(f"{self.name}: cache depth {cache.depth} is deeper than its U-Net allows "
                                      f"(1..{depths}: all its up-blocks but the first)")
        if cache.refresh is not None and cache.refresh[-1] >= settings.steps:
            raise InvalidRequestError(f"{self.name}: cache refresh step {cache.refresh[-1]} is past its "
                                      f"{settings.steps} steps")

    def validate_input_size(self, size) -> None:
        """Refuse a user's input image (H, W) this stage cannot take."""

    def validate_edit_size(self, size) -> None:
        """Refuse an edit's picture (h, w), as sized for this stage, that its U-Net cannot take."""
        fixed = getattr(self.unet, "fixed_size", None)  # an export built for one sample size
        if fixed is not None and tuple(size) != tuple(fixed):
            raise InvalidRequestError(
                f"{self.name} runs an export built for {fixed[1]}x{fixed[0]} samples, and this picture is sized "
                f"{size[1]}x{size[0]} for it (its aspect kept): give a square picture, or load the model with the "
                "torch backend")

    def _draw(self, generator, shape) -> torch.Tensor:
        # On the CPU generator in the stage dtype, as diffusers' randn_tensor does, then moved; with a list of
        # generators (one per image, as diffusers takes them) sample i from generator[i], as theirs.
        if isinstance(generator, (list, tuple)):
            return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=self.dtype) for g in generator]
                             ).to(self.device)
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)

    @torch.inference_mode()
    def run(self, text: Conditioning, previous: torch.Tensor | None, settings: StageSettings,
            generator: torch.Generator, progress: bool = True, on_step=None, edit: Edit | None = None
            ) -> torch.Tensor:
        """Denoise one batch; returns x_0 as float32 (B, 3, size, size), unclamped (about [-1, 1]).

        on_step(stage name, step, total), if given, is called after each step's U-Net call is queued; it reads
        no tensor, so it adds no host sync."""
        run = self.start(text, previous, settings, generator, edit)
        self.denoise(run, progress, on_step)
        return run.result()

    def denoise(self, run: "StageRun", progress: bool = False, on_step=None) -> None:
        """Step `run` to its end, one U-Net call per step, through the stage's executor."""
        self.executor.denoise(run, progress, on_step)

    @torch.inference_mode()
    def start(self, text: Conditioning, previous: torch.Tensor | None, settings: StageSettings,
              generator: torch.Generator, edit: Edit | None = None) -> "StageRun":
        """One request's run of this stage, all its random draws made: step it with StageRun.advance."""
        return StageRun(self, text, previous, settings, generator, edit)

    def _initial(self, previous, batch: int, noise_level: int | None, generator: torch.Generator):
        """x_T (B, 3, size, size) and, for super-resolution, the augmented low-res image, in diffusers' draw order."""
        x = self._draw(generator, (batch, IMAGE_CHANNELS, self.size, self.size))
        if self.noising is None:
            return x, None
        up = F.interpolate(previous.to(self.dtype), (self.size, self.size), mode="bilinear", align_corners=True)
        return x, self._noised(up, noise_level, generator)

    def _edited(self, edit: Edit, previous, noise_level: int | None, generator: torch.Generator,
                alphas_cumprod: torch.Tensor, timestep: int):
        """An edit's x at its first step (B, 3, h, w): its picture noised to that step's `timestep` on the
        sampler's schedule (kept where a mask keeps it), and for super-resolution the previous image upsampled
        to the picture's size and augmented."""
        image = edit.image
        noised = add_noise(image, self._draw(generator, image.shape), alphas_cumprod, timestep)
        if edit.mask is None:
            x = noised
        else:
            mask = edit.mask.to(image.dtype)
            x = (1 - mask) * image + mask * noised
        if self.noising is None:
            return x, None
        up = F.interpolate(previous.to(self.dtype), image.shape[-2:], mode="bilinear", align_corners=True)
        return x, self._noised(up, noise_level, generator)

    def _noised(self, image: torch.Tensor, noise_level: int, generator: torch.Generator) -> torch.Tensor:
        """Noise augmentation: `image` at step `noise_level` of the image-noising schedule (diffusers' add_noise)."""
        return add_noise(image, self._draw(generator, image.shape), self.noising.alphas_cumprod, noise_level)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _guide(self, out: torch.Tensor, guidance: float | None):
        """Split (and guide) the U-Net output: eps (B, 3, H, W) and the variance channels (B, 3, H, W) or None.

        With guidance the batch is [uncond; cond]: guidance moves eps, the variance comes from the cond half.
        """
        if guidance is not None:
            uncond, cond = out.chunk(2)
            c = self.sample_channels
            eps = uncond[:, :c] + guidance * (cond[:, :c] - uncond[:, :c])
            out = cond
        else:
            eps = out[:, :self.sample_channels]
        variance = out[:, IMAGE_CHANNELS:] if self.learned_variance else None
        return eps, variance


def add_noise(image: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timestep: int) -> torch.Tensor:
    """`image` noised to `timestep` of a schedule, as diffusers' DDPMScheduler.add_noise computes it: in the
    image's dtype, alpha-bar cast to it first."""
    acp = alphas_cumprod.to(device=image.device, dtype=image.dtype)[timestep]
    return acp**0.5 * image + (1 - acp) ** 0.5 * noise


_SERIALS = itertools.count()  # StageRun.serial: unique in the process, unlike id() of a freed run


class StageRun:
    """One request's progress through one stage, a U-Net call at a time.

    `Stage.run` drives one to the end; a serving scheduler drives several together: the stage's executor
    (executor.py) makes one U-Net call over their rows (each row at its own timestep) and each takes its rows
    back through `advance`. Everything random is drawn here, at the start, from the request's own generator, so
    a request's images do not depend on what it was batched with.
    """

    def __init__(self, stage: Stage, text: Conditioning, previous: torch.Tensor | None, settings: StageSettings,
                 generator: torch.Generator, edit: Edit | None = None):
        self.stage = stage
        self.settings = settings
        self.serial = next(_SERIALS)  # names it in the executor's record of whose conditioning rows it holds
        self.sampler = build_sampler(settings.sampler or stage.default_sampler, stage.scheduler_config,
                                     settings.timesteps, stage.device)
        batch = text.cond.shape[0]
        timesteps = self.sampler.timesteps.tolist()  # on the host once: the edit's start and the plans below
        # The step it starts at: 0, or an edit's first step (its strength); the steps before it do not run.
        self.step = first = settings.first_step if edit is not None else 0
        if edit is None:
            x, low_res = stage._initial(previous, batch, settings.noise_level, generator)  # (B, C, H, W), (B, 3, H, W)
            self.x = x.float() * self.sampler.init_noise_sigma  # float32
        else:
            x, low_res = stage._edited(edit, previous, settings.noise_level, generator,
                                       self.sampler.schedule.alphas_cumprod, timesteps[first])
            self.x = x.float()  # diffusers' edit pipelines start from the noised picture as it is
        self.mask = None if edit is None or edit.mask is None else edit.mask.float()  # (B, 1, h, w)
        self.keep = None if self.mask is None else 1 - self.mask  # made once: every step keeps x where it is 1

        # Which steps guide, read from the host once per stage (the guidance interval); each guided step runs
        # [uncond; cond] (2B rows), any other the cond half alone (B rows).
        guides = text.uncond is not None
        self.guided_steps = [guides and settings.guided_at(t) for t in timesteps]
        self.cond = text.cond  # (B, 77, D)
        self.pair = torch.cat([text.uncond, text.cond]) if any(self.guided_steps) else None  # (2B, 77, D)
        self.low_res, self.class_labels = low_res, None  # (B, 3, H, W); per step kind: labels (rows,)
        if low_res is not None:
            labels = torch.full((batch,), settings.noise_level, device=stage.device)
            self.class_labels = {False: labels, True: labels.repeat(2)}  # made once, not at every step
        self.noise = [stage._draw(generator, self.x.shape) if noisy and step >= first else None
                      for step, noisy in enumerate(self.sampler.noise_steps)]
        self.sampler.start(self.x, first)
        # Feature caching: which steps are full (by the cache's plan) and which shallow, read from the host
        # once, so no step decides on a tensor; and what the last full step kept for the shallow ones.
        self.cache = settings.cache
        self.full_steps = [self.cache is None or step < first or self.cache.full_at(step - first, timesteps[step])
                           for step in range(len(timesteps))]
        self.shallow_steps = self._shallow_plan(first)
        self.kept: torch.Tensor | None = None  # (rows, C, h, w), its rows of the last full call (StepRunner: its own)

    def _shallow_plan(self, first: int) -> list[bool]:
        """Per step, whether it is shallow: planned so, and the last full step's rows were of its kind (guided
        or not); a planned shallow step whose kind differs is made full instead, and keeps anew."""
        plan, kept_kind = [False] * len(self.full_steps), None
        for step in range(first, len(self.full_steps)):
            guided = self.guided_steps[step]
            if self.full_steps[step] or kept_kind != guided:
                kept_kind = guided if self.cache is not None else None
            else:
                plan[step] = True
        return plan

    @property
    def steps(self) -> int:
        return len(self.sampler)

    @property
    def done(self) -> bool:
        return self.step == self.steps

    @property
    def guided(self) -> bool:
        """Whether the next step runs classifier-free guidance."""
        return self.guided_steps[self.step]

    @property
    def shallow(self) -> bool:
        """Whether the next step is a shallow one (feature caching; `_shallow_plan`)."""
        return self.shallow_steps[self.step]

    @property
    def step_kind(self) -> tuple[str, int]:
        """The U-Net call of the next step (`kind_at`)."""
        return self.kind_at(self.step)

    def kind_at(self, step: int) -> tuple[str, int]:
        """The U-Net call of `step`, (kind, caching depth): ("unet", 0) without caching, else ("full", d) or
        ("shallow", d)."""
        if self.cache is None:
            return "unet", 0
        return ("shallow" if self.shallow_steps[step] else "full"), self.cache.depth

    @property
    def rows(self) -> int:
        """The U-Net rows of the next step: 2B under guidance ([uncond; cond]), else B."""
        return self.x.shape[0] * (2 if self.guided else 1)

    @property
    def timestep(self) -> torch.Tensor:
        """The next step's U-Net timestep, a 0-d int64 tensor on the device."""
        return self.sampler.timesteps[self.step]

    def conditioning(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next step's conditioning rows: embeddings (rows, 77, D) and class labels (rows,) or None."""
        guided = self.guided
        labels = None if self.class_labels is None else self.class_labels[guided]
        return (self.pair if guided else self.cond), labels

    def advance(self, out: torch.Tensor) -> None:
        """Take this run's U-Net output (rows, out_channels, H, W), float32: guidance, then the sampler step."""
        guidance = self.settings.guidance if self.guided else None
        x = update(self.stage, self.sampler, self.step, out, guidance, self.x, self.noise[self.step])
        self.x = x if self.mask is None else keep_masked(self.x, x, self.mask, self.keep)
        self.step += 1

    def result(self) -> torch.Tensor:
        """x_0 as float32 (B, 3, H, W) once done (decoded by a latent stage); NumericalError on NaN or inf."""
        if not torch.isfinite(self.x).all():
            raise NumericalError(
                f"{self.stage.name} produced NaN or inf values; the likely cause is float16 overflow in the U-Net: "
                "load with dtype='bfloat16' or 'float32'")
        return self.stage._finish(self.x)


class LatentUpscaleStage(Stage):
    """Stability's x4 upscaler as diffusers' StableDiffusionUpscalePipeline runs it (v-prediction DDIM by config).

    `decoder(latents)` is a backend's VAE decoder: (B, 4, h, w) latents as the sampler leaves them (it divides
    by the VAE's scaling factor itself) -> (B, 3, scale * h, scale * w) image in about [-1, 1].
    """

    def __init__(self, name: str, unet, decoder, scheduler_config: Mapping[str, Any], noising: NoiseSchedule,
                 device: torch.device, dtype: torch.dtype, text, max_noise_level: int,
                 defaults: StageDefaults | None = None):
        super().__init__(name, unet, scheduler_config, noising, device, dtype, text=text, defaults=defaults)
        self.decoder = decoder
        self.max_noise_level = max_noise_level
        self.latent_channels = decoder.latent_channels
        self.learned_variance = False  # the U-Net predicts v (or eps) for the 4 latent channels only

    @property
    def kind(self) -> str:
        return "latent_upscaler"

    @property
    def sample_channels(self) -> int:
        return self.latent_channels

    def output_size(self, input_size: int | None) -> int | None:
        return None if input_size is None else input_size * self.decoder.scale  # None: the user's image decides

    def validate(self, settings: StageSettings) -> None:
        super().validate(settings)
        if settings.noise_level > self.max_noise_level:
            raise InvalidRequestError(f"{self.name} (x4 upscaler) takes noise_level 0..{self.max_noise_level}, got "
                                      f"{settings.noise_level}: give one noise level per stage, e.g. (250, 20)")

    def validate_input_size(self, size) -> None:
        # The U-Net halves the latents once per down block but the last: its sides must divide evenly.
        factor = self.unet.downsampling
        if any(side % factor for side in size):
            raise InvalidRequestError(f"{self.name} (x4 upscaler) needs image sides that are multiples of "
                                      f"{factor}, got {tuple(size)}: crop or resize the image")

    def _initial(self, previous, batch: int, noise_level: int | None, generator: torch.Generator):
        image = previous.to(self.dtype)  # (B, 3, h, w) in [-1, 1]: the latents get the image's own size
        low_res = self._noised(image, noise_level, generator)
        x = self._draw(generator, (batch, self.latent_channels, *image.shape[2:]))
        return x, low_res

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x).float()


def timed(device: torch.device, fn, *args):
    """Run fn(*args); return (result, seconds), synchronising the device once at the end."""
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start
