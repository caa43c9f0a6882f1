"""The written contract between the runtime and a backend.

A backend turns one stage's files (`model_dir.StageSpec`) into callable components; `assemble.build_pipeline`
puts them into Stages and a Pipeline, and the runtime (stage.py, text.py) calls them. Nothing else of a backend
is seen. Adding one is a file in this folder that provides `Components`, and its name in `BACKENDS`
(backends/__init__.py); tests/test_backend_protocol.py does exactly that with a wrapper of the torch backend.

Shapes: B rows (images, twice under guidance), C channels, H x W the stage's sample size, D the text width.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class UNet(Protocol):
    """A denoising U-Net. The runtime reads these attributes:"""

    in_channels: int  # 3 (base), 6 (super-resolution: x_t + upsampled image), 7 (x4: 4 latent + 3 image)
    out_channels: int  # 3 (eps or v), 6 (IF's eps + learned variance), 4 (x4's latents)
    sample_size: int  # the side of the images it denoises (the x4 upscaler's is nominal: its input decides)
    downsampling: int  # input sides must be multiples of it (2 ** (number of down blocks - 1))
    dtype: torch.dtype  # what sample and encoder_hidden_states are cast to before the call

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, in_channels, H, W) in `dtype`; timestep (B,) int64, one per row (rows may be at
        different steps); encoder_hidden_states (B, 77, D); class_labels (B,) int64, the noise level, for
        super-resolution and x4 stages, else None -> (B, out_channels, H, W), any float dtype."""


# What a U-Net may also say it can do; the runtime asks with getattr, so a U-Net without them is eager:
#   static: bool               True: compiled per shape; the stage's executor (engine/executor.py) calls it on
#                              buffers allocated once per shape (rows padded to a bucket), captures it on CUDA,
#                              and passes `values` (below) as a fifth argument, possibly None
#   fixed_size: (H, W) | None  the one sample size it takes (an export built for its sample size); None or
#                              absent: any size that `downsampling` divides (an edit's picture keeps its aspect)
#   cache_depths: int          the deepest feature caching across steps it takes (absent: none), with
#                              full(sample, t, ehs, labels, depth) -> (out, kept) and
#                              shallow(sample, t, ehs, labels, kept, depth) -> out (torch_backend.TorchUNet),
#                              a static one taking `values` last in both; kept_shape(rows, H, W, depth) where
#                              static (its buffers are allocated before the first call)
#   text_constants(embeddings) -> dict[str, Tensor] | None
#                              what it computes from (rows, 77, D) embeddings alone, once per request (or per
#                              change of a batch's members) instead of at every step; None: nothing


@runtime_checkable
class VAEDecoder(Protocol):
    """The x4 upscaler's latent decoder."""

    latent_channels: int  # 4
    scale: int  # the decoded image is `scale` times the latents' sides

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, latent_channels, h, w) as the sampler leaves them (the decoder divides by its scaling
        factor itself) -> image (B, 3, scale * h, scale * w) in about [-1, 1]."""


@runtime_checkable
class TextModel(Protocol):
    """A text encoder, called as transformers' encoders are."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """input_ids (B, 77) int64; attention_mask (B, 77) int64 for T5, None for CLIP (which attends to its
        padding) -> a tuple whose first item is the hidden states (B, 77, D)."""


@runtime_checkable
class Components(Protocol):
    """What a backend hands `assemble.build_pipeline`: the components of each stage."""

    backend: str  # its name, as BACKENDS registers it (Pipeline.backend; batch manifests record it)
    device: torch.device  # where the runtime keeps its tensors for these components
    dtype: torch.dtype  # the U-Nets' precision

    def text_encoder(self, stage) -> tuple[object, TextModel, int]:
        """The (tokenizer, text model, width D) of a stage that encodes prompts: the first stage (T5) and the
        x4 upscaler (CLIP); `stage` is a model_dir.StageSpec."""

    def unet(self, stage) -> UNet:
        """The stage's U-Net."""

    def vae_decoder(self, stage) -> VAEDecoder:
        """The x4 upscaler's VAE decoder (asked of latent_upscaler stages only)."""

    def run_context(self):
        """A function returning the context manager entered around each generation (the backend's own setup:
        ORT on CPU keeps torch on one thread), or None for none."""
