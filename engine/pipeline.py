"""The cascade: encode the prompt once, run the stages in order, return images.

`Pipeline.generate` is the public call; `Pipeline.run` does the same and also returns per-stage timings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from engine.options import GenerateRequest
from engine.stage import Conditioning, Stage, timed
from engine.text import TextEncoder


@dataclass
class Generation:
    """The images of one request and where the time went (seconds, device synchronised per stage)."""

    images: object  # list[PIL.Image] | np.ndarray (B, H, W, 3) float32 | torch.Tensor (B, 3, H, W) float32
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    def __init__(self, text: TextEncoder, stages: list[Stage], device: torch.device, dtype: torch.dtype,
                 source: str = "", notice: str | None = None):
        self.text = text
        self.stages = stages
        self.device = device
        self.dtype = dtype
        self.source = source  # what it was loaded from, for messages
        self.notice = notice  # something the user must know about this model (e.g. random weights)

    @property
    def image_size(self) -> int:
        return self.stages[-1].size

    def __repr__(self) -> str:
        sizes = " -> ".join(f"{s.name}({s.kind}, {s.size}px)" for s in self.stages)
        return f"Pipeline({sizes}, device={self.device}, dtype={self.dtype}, source={self.source!r})"

    def generate(self, prompt, **options):
        """Images for `prompt` (a string or a list of strings); options as in `GenerateRequest`."""
        return self.run(GenerateRequest(prompt, **options)).images

    def run(self, request: GenerateRequest, progress: bool = False) -> Generation:
        settings = request.per_stage([s.kind for s in self.stages])  # validates per-stage values first
        timings: dict[str, float] = {}
        n = request.num_images_per_prompt
        conditioning, timings["text"] = timed(self.device, self._conditioning, request, settings)
        conditioning = Conditioning(
            cond=conditioning.cond.repeat_interleave(n, dim=0),
            uncond=None if conditioning.uncond is None else conditioning.uncond.repeat_interleave(n, dim=0))

        generator = torch.Generator("cpu").manual_seed(request.seed)
        image = None
        for stage, stage_settings in zip(self.stages, settings):
            image, timings[stage.name] = timed(
                self.device, stage.run, conditioning, image, stage_settings, generator, progress)
        return Generation(self._output(image, request.output_type), timings)

    def _conditioning(self, request: GenerateRequest, settings) -> Conditioning:
        prompts = request.prompts
        cond = self.text.encode(prompts)  # (B, 77, D)
        if not any(s.guidance > 1.0 for s in settings):
            return Conditioning(cond, None)
        negatives = request.negative_prompts
        if negatives is None:
            uncond = self.text.empty().expand(len(prompts), -1, -1)
        else:
            uncond = self.text.encode(negatives)
        return Conditioning(cond, uncond)

    @staticmethod
    def _output(image: torch.Tensor, output_type: str):
        image = (image / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
        if output_type == "pt":
            return image
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return array
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
