"""Noise schedules and timestep lists, computed once per run, outside the denoising loop.

A `NoiseSchedule` holds the training-time cumulative alphas (what every sampler is built from); the timestep
functions reproduce diffusers' `set_timesteps` spacings and DeepFloyd IF's respaced schedules (`smart27`, ...).
Values follow diffusers' arithmetic (betas and their cumulative product in float32) so that samplers built
here agree with diffusers' schedulers to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

# DeepFloyd IF's respaced schedules, as section counts over 1000 training steps (the improved-diffusion
# respacing rule, `respaced_timesteps`). Tests check each against the timestep lists diffusers ships.
NAMED_SCHEDULES: dict[str, str] = {
    "fast27": "10,10,3,2,2",
    "smart27": "7,4,2,1,2,4,7",
    "smart50": "10,6,4,3,2,2,3,4,6,10",
    "smart100": "1,1,1,1,2,2,2,2,2,2,3,3,4,4,5,5,6,7,7,8,9,10,13",
    "smart185": "1,1,2,2,2,3,3,3,4,5,6,7,8,9,10,11,12,13,14,15,16,18,20",
    "super27": "1,1,1,1,1,1,1,2,5,13",
    "super40": "2,2,2,2,2,2,3,4,6,15",
    "super100": "4,4,6,6,8,8,10,10,14,30",
}

SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process of a scheduler config: `alphas_cumprod[t]` for t in [0, num_train_timesteps)."""

    alphas_cumprod: torch.Tensor  # (T,) float32, on CPU
    num_train_timesteps: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        steps = int(config.get("num_train_timesteps", 1000))
        betas = _betas(config, steps)
        return cls(torch.cumprod(1.0 - betas, dim=0), steps)


def _betas(config: Mapping[str, Any], steps: int) -> torch.Tensor:
    trained = config.get("trained_betas")
    if trained is not None:
        return torch.tensor(trained, dtype=torch.float32)
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":
        # Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), betas capped.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unsupported beta_schedule {kind!r}; supported: linear, scaled_linear, squaredcos_cap_v2")


def spaced_timesteps(num_train: int, steps: int, spacing: str = "leading", offset: int = 0) -> list[int]:
    """Evenly spaced descending timesteps, as diffusers' DDPM/DDIM `set_timesteps(steps)` computes them."""
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, steps).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (num_train // steps)).round()[::-1] + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train, 0, -num_train / steps)) - 1
    else:
        raise ValueError(f"unsupported timestep_spacing {spacing!r}; supported: {', '.join(SPACINGS)}")
    return [int(t) for t in ts]


def respaced_timesteps(num_train: int, section_counts: Sequence[int]) -> list[int]:
    """Descending timesteps from section counts: split [0, T) into equal sections, take evenly spaced steps in each.

    This is the respacing rule of improved-diffusion, which DeepFloyd IF's named schedules use.
    """
    size, extra = divmod(num_train, len(section_counts))
    taken: set[int] = set()
    start = 0
    for i, count in enumerate(section_counts):
        section = size + (1 if i < extra else 0)
        if count > section:
            raise ValueError(f"cannot take {count} steps from a section of {section} timesteps")
        stride = 1.0 if count == 1 else (section - 1) / (count - 1)
        position = 0.0  # accumulated, not k * stride: the rounding of the sum is what the lists hold
        for _ in range(count):
            taken.add(start + round(position))
            position += stride
        start += section
    return sorted(taken, reverse=True)


def named_timesteps(name: str, num_train: int = 1000) -> list[int]:
    """The timesteps of one of IF's named schedules ("smart27", "smart50", "smart100", ...)."""
    if name not in NAMED_SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(NAMED_SCHEDULES)}")
    return respaced_timesteps(num_train, [int(c) for c in NAMED_SCHEDULES[name].split(",")])
