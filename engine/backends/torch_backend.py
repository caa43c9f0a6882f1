"""The PyTorch backend: diffusers' UNet2DConditionModel and AutoencoderKL behind the runtime's component calls."""

from __future__ import annotations

import torch


class TorchUNet:
    """Calls a diffusers `UNet2DConditionModel` with named tensors and returns its output tensor."""

    def __init__(self, model, attention: str = "sdpa"):
        from engine.backends.attention import install

        self.model = model.eval().requires_grad_(False)
        self.attention = attention
        install(self.model, attention)
        if model.device.type == "cuda":
            # channels_last: the U-Nets are ~90% convolution and cuDNN runs NHWC faster. Not on CPU: there it
            # is 15% faster too, but its rounding moved a 6-step DDIM cascade 1.3e-4 from diffusers, past the
            # 1e-4 float32 parity bound (bench/RESULTS.md).
            self.model.to(memory_format=torch.channels_last)
        config = model.config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.sample_size = config.sample_size
        self.downsampling = 2 ** (len(config.block_out_channels) - 1)  # input sides must be multiples of it
        self.dtype = model.dtype

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        # sample (B, in_channels, H, W); timestep (B,) int64, one per row (the scheduler batches runs at
        # different steps); encoder_hidden_states (B, 77, D) -> (B, out, H, W)
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                          class_labels=class_labels, return_dict=False)[0]


class TorchVAEDecoder:
    """Decodes latents with a diffusers `AutoencoderKL`, as StableDiffusionUpscalePipeline does."""

    def __init__(self, vae, attention: str = "sdpa"):
        from engine.backends.attention import install

        self.vae = vae.eval().requires_grad_(False)
        install(self.vae, attention)
        config = vae.config
        self.scaling_factor = config.scaling_factor
        self.latent_channels = config.latent_channels
        self.scale = 2 ** (len(config.block_out_channels) - 1)  # each decoder up block but the last doubles H, W

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        # latents (B, 4, h, w) -> (B, 3, scale * h, scale * w). Cast first, then divide, in diffusers' order.
        latents = latents.to(self.vae.dtype)
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
