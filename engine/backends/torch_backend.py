"""The PyTorch backend: diffusers' UNet2DConditionModel and AutoencoderKL and transformers' T5 and CLIP encoders,
read from a stage's directory, behind the runtime's component calls (backends/protocol.py)."""

from __future__ import annotations

import logging
import os

import torch

from engine.backends.attention import TIMED_CALLS, by_timing, install, timer_for
from engine.errors import ModelError
from engine.executor import _capture
from engine.backends.compiled import COMPILE_OPTIONS, INDUCTOR_CACHE_ENV, compiled_dir
from engine.backends.fast_unet import FastUNet, resolve_fast  # resolve_fast: the device's default, also the bench's
from engine.backends.text_constants import TextConstants
from engine.model_dir import downsampling, load_tokenizer, model_config, text_config, text_width, weights_variant

log = logging.getLogger(__name__)


def example_call(model, device: torch.device, fast: bool = False):
    """One call of a diffusers U-Net in the form it will run, for attention="auto" to time (attention.by_timing):
    2 rows (one guided image, the pipeline's rows per call) at its own sample size, random inputs, on the model
    as it is (TorchComponents.unet makes it channels_last on CUDA first, as TorchUNet runs it). `fast`: as the
    fast path runs it, a channels_last sample, compiled as CompiledCall compiles on CUDA (torch.compile, static
    shapes, inductor's options; on CPU likewise, where the fast path would load an AOTInductor package of the
    same graph instead) and on CUDA replayed from a CUDA graph, as the executor replays it.
    Not reproduced (the same for both choices, and costly to rebuild at load): the fast path's text constants
    (text_constants.py: the text-only projections leave the step; the attention itself sees the same shapes),
    its other row buckets, and a whole step's capture (guidance and sampler update beside the U-Net)."""
    config = model.config
    dtype = model.dtype
    size = config.sample_size
    sample = torch.randn(2, config.in_channels, size, size, device=device, dtype=dtype)
    if fast:
        sample = sample.contiguous(memory_format=torch.channels_last)  # as FastUNet passes it
    timestep = torch.full((2,), 500, device=device)
    text = torch.randn(2, 77, text_width(config), device=device, dtype=dtype)
    sr = config.class_embed_type is not None or config.num_class_embeds is not None
    labels = torch.full((2,), 100, device=device) if sr else None

    def call():
        return model(sample, timestep, encoder_hidden_states=text, class_labels=labels, return_dict=False)[0]

    if not fast:
        return call
    # As CompiledCall sets them: inductor's cache where the fast path keeps it, and room for one graph per U-Net
    # and choice, all through this one function (past dynamo's limit it would run uncompiled, unsaid)
    os.environ.setdefault(INDUCTOR_CACHE_ENV, str(compiled_dir() / "inductor"))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(call, dynamic=False, options=dict(COMPILE_OPTIONS[device.type]))
    if device.type != "cuda":
        return compiled
    return _capture(device, compiled, private=True).replay  # as the executor replays it; its own pool


def text_dtype(dtype: torch.dtype) -> torch.dtype:
    """T5 overflows in float16: it runs in bfloat16 instead (or float32 when everything does)."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


class TorchComponents:
    """Components (backends/protocol.py) from model directories: `variant` None picks the weight files by
    dtype (model_dir.weights_variant); attention is "sdpa" or "triton" (attention.py); `fast`: the U-Nets
    run on the fast path (fast_unet.py: static, text constants, compiled; the executor adds static buffers and CUDA graphs)."""

    backend = "torch"

    def __init__(self, device: torch.device, dtype: torch.dtype, attention: str, variant: str | None = None,
                 fast: bool = False, offload: str | None = None, text_encoder_device: torch.device | None = None):
        self.device, self.dtype, self.attention, self.variant = device, dtype, attention, variant
        self.fast = fast
        self.offload = offload  # engine/offload.py installs it once the pipeline is built
        # Where the models are loaded: host memory when offloaded (offload.py puts them on the device as they run)
        self.home = torch.device("cpu") if offload else device
        self.text_device = text_encoder_device or device  # where the text encoder runs

    def run_context(self):
        return None

    def text_encoder(self, stage):
        """IF's T5 encoder (bfloat16 where the U-Nets run float16), or the x4 upscaler's CLIP."""
        from transformers import CLIPTextModel, T5EncoderModel

        clip = stage.kind == "latent_upscaler"
        cls, as_dtype = (CLIPTextModel, self.dtype) if clip else (T5EncoderModel, text_dtype(self.dtype))
        folder = stage.directory / "text_encoder"
        config = text_config(folder)
        chosen = weights_variant(folder, self.dtype, f"transformers.{cls.__name__}", self.variant)
        tokenizer = load_tokenizer(stage.directory)
        try:
            model = cls.from_pretrained(folder, config=config, use_safetensors=True, variant=chosen, dtype=as_dtype,
                                        trust_remote_code=False, local_files_only=True)
        except Exception as exc:  # transformers raises many types for bad weight files
            raise ModelError(folder, f"cannot load the {'CLIP' if clip else 'T5'} encoder weights: {exc}") from exc
        dim = model.config.hidden_size if clip else model.config.d_model
        home = self.text_device if self.text_device != self.device and not clip else self.home
        return tokenizer, model.to(home).eval(), dim

    def unet(self, stage):
        from diffusers import UNet2DConditionModel

        model = self._diffusers(UNet2DConditionModel, stage.directory / "unet", "U-Net", self.dtype).to(self.home)
        attention, seconds = self.attention, None
        if attention == "auto" and self.home != self.device:  # offloaded: not on the GPU to be timed there
            attention = "triton"
        if attention == "auto":  # timed here, on the device it runs on, in the form it runs in (example_call)
            if self.device.type == "cuda":
                model.to(memory_format=torch.channels_last)  # TorchUNet's layout there
            attention, seconds = by_timing(model, lambda: example_call(model, self.device, self.fast),
                                           timer_for(self.device))
            log.info("%s: attention=%s (median of %d calls, %s: %s)", stage.name, attention, TIMED_CALLS,
                     "compiled and replayed as the fast path runs it" if self.fast else "eager",
                     ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in seconds.items()))
        unet = TorchUNet(model, attention, self.device)
        chosen = FastUNet(unet, stage.directory / "unet") if self.fast else unet
        if seconds is not None:  # what chose it, median seconds per choice; .attention is its argmin
            unet.attention_seconds = chosen.attention_seconds = seconds
        return chosen

    def vae_decoder(self, stage):
        from diffusers import AutoencoderKL

        folder = stage.directory / "vae"
        # The VAE overflows in float16: diffusers decodes in float32 when the config says force_upcast (default).
        upcast = self.dtype == torch.float16 and model_config(folder, "AutoencoderKL", "VAE config")["force_upcast"]
        vae = self._diffusers(AutoencoderKL, folder, "vae", torch.float32 if upcast else self.dtype)
        # under "auto", the VAE (the x4 upscaler's) takes CUDA's default, Triton: only the U-Nets are timed
        return TorchVAEDecoder(vae.to(self.home), "triton" if self.attention == "auto" else self.attention)

    def _diffusers(self, cls, folder, what: str, dtype: torch.dtype):
        # The variant follows the stage's dtype, also for an upcast VAE, as diffusers' variant= does.
        chosen = weights_variant(folder, self.dtype, f"diffusers.{cls.__name__}", self.variant)
        try:
            return cls.from_pretrained(folder, use_safetensors=True, variant=chosen, torch_dtype=dtype)
        except Exception as exc:  # diffusers raises many types for bad weight files
            raise ModelError(folder, f"cannot load the {what} weights: {exc}") from exc


class SteppedForward(torch.nn.Module):
    """diffusers' UNet2DConditionModel.forward written out, for feature caching's two calls (TorchUNet.full and
    .shallow): the same ops in the same order as the model's own forward, for the configs the engine loads (no
    attention masks, adapters, ControlNet residuals or GLIGEN, none of which a cascade passes).

    Written out, not hooked: a hook registered inside a call is a graph break for torch.compile, and a
    recompile at every call (fatal inside a CUDA-graph capture). A module of its own, so that its call is an
    entry module offload hooks (engine/offload.py) as it hooks the model's: both calls put the weights on the
    device as a plain call does, though they call the model's blocks directly."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, class_labels, depth: int, kept=None):
        """kept None: the full call -> (out (rows, C_out, H, W), the input of up-block -depth (rows, C, h, w));
        else the shallow call from that input -> (out, kept)."""
        m = self.model
        if m.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = m.time_embedding(m.get_time_embed(sample=sample, timestep=timestep), None)  # (rows, E)
        class_emb = m.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if m.config.class_embeddings_concat else emb + class_emb
        aug = m.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
        emb = emb if aug is None else emb + aug
        if m.time_embed_act is not None:
            emb = m.time_embed_act(emb)
        # (rows, 77, D) -> the tokens the blocks attend to (IF: projected to the U-Net's width)
        hidden = m.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
        # diffusers passes up-blocks an explicit upsample size where the sides are not multiples of it
        odd = any(side % 2 ** m.num_upsamplers for side in sample.shape[-2:])
        x = m.conv_in(sample)
        skips = (x,)
        for block in m.down_blocks if kept is None else m.down_blocks[:depth]:
            x, res = block(hidden_states=x, temb=emb, **_text(block, hidden))
            skips += res
        ups = m.up_blocks[-depth:]
        if kept is None:  # the deep part: mid-block and the up-blocks above the kept input
            if m.mid_block is not None:
                x = m.mid_block(x, emb, **_text(m.mid_block, hidden))
            x, skips = _up(m, m.up_blocks[:-depth], x, skips, emb, hidden, odd)
            kept = x
        else:  # the deeper skips are the kept input's
            skips = skips[:sum(len(block.resnets) for block in ups)]
        x, _ = _up(m, ups, kept, skips, emb, hidden, odd)
        if m.conv_norm_out is not None:
            x = m.conv_act(m.conv_norm_out(x))
        return m.conv_out(x), kept


def _text(block, hidden) -> dict:
    """A block's text argument: the tokens where it attends to them."""
    return {"encoder_hidden_states": hidden} if getattr(block, "has_cross_attention", False) else {}


def _up(m, blocks, x, skips: tuple, emb, hidden, odd: bool):
    """`blocks` (consecutive up-blocks of m) on x, each taking its skip connections off the end of `skips`;
    -> (x, the skips left)."""
    for block in blocks:
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        size = skips[-1].shape[2:] if odd and block is not m.up_blocks[-1] else None
        x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=size, **_text(block, hidden))
    return x, skips


class TorchUNet:
    """Calls a diffusers `UNet2DConditionModel` with named tensors and returns its output tensor."""

    attention_seconds: dict[str, float] | None = None  # attention="auto": median seconds per choice (by_timing)

    def __init__(self, model, attention: str = "sdpa", device: torch.device | None = None):
        self.model = model.eval().requires_grad_(False)
        self.attention = attention
        install(self.model, attention)
        self.stepped = SteppedForward(self.model)  # full and shallow calls (feature caching)
        if (device or model.device).type == "cuda":  # where it runs (offloaded: it waits in host memory)
            # channels_last: the U-Nets are ~90% convolution and cuDNN runs NHWC faster. Not on CPU: there it
            # is 15% faster too, but its rounding moved a 6-step DDIM cascade 1.3e-4 from diffusers, past the
            # 1e-4 float32 parity bound (bench/RESULTS.md).
            self.model.to(memory_format=torch.channels_last)
        config = model.config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.sample_size = config.sample_size
        self.downsampling = downsampling(config.block_out_channels)  # input sides must be multiples of it
        self.dtype = model.dtype

    def modules(self):
        """(module, its entry modules) for offload (engine/offload.py): a plain call enters by the model, a full
        or shallow one by `stepped`."""
        return self.model, [self.model, self.stepped]

    @property
    def cache_depths(self) -> int:
        """The deepest feature caching it takes (protocol.py): all its up-blocks but the first."""
        return len(self.model.up_blocks) - 1

    def kept_shape(self, rows: int, height: int, width: int, depth: int) -> tuple[int, int, int, int]:
        """The shape of what a full call at `depth` keeps for a `rows`-row (rows, C, height, width) sample: the
        input of up-block -depth, which runs at 1/2^(depth-1) of the sample's sides with the channels of the
        level below it (block_out_channels[depth])."""
        scale = 2 ** (depth - 1)
        return rows, self.model.config.block_out_channels[depth], height // scale, width // scale

    def full(self, sample, timestep, encoder_hidden_states, class_labels, depth: int):
        """A full call that also returns what a shallow call at `depth` reuses: (out, the input of the last
        `depth` up-blocks (rows, C, h, w)); out is the plain call's to the bit (the same ops in the same order)."""
        return self.stepped(sample, timestep, encoder_hidden_states, class_labels, depth)

    def shallow(self, sample, timestep, encoder_hidden_states, class_labels, kept, depth: int):
        """A shallow call (DeepCache): the embeddings, conv_in, the first `depth` down-blocks, then the last
        `depth` up-blocks on `kept` (a full call's, see `full`) with the fresh skip connections, and the head.
        Given the full call's own inputs it returns the full call's output exactly."""
        return self.stepped(sample, timestep, encoder_hidden_states, class_labels, depth, kept)[0]

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        # sample (B, in_channels, H, W); timestep (B,) int64, one per row (the scheduler batches runs at
        # different steps); encoder_hidden_states (B, 77, D) -> (B, out, H, W)
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                          class_labels=class_labels, return_dict=False)[0]


class TorchVAEDecoder:
    """Decodes latents with a diffusers `AutoencoderKL`, as StableDiffusionUpscalePipeline does."""

    def __init__(self, vae, attention: str = "sdpa"):
        self.vae = vae.eval().requires_grad_(False)
        install(self.vae, attention)
        config = vae.config
        self.scaling_factor = config.scaling_factor
        self.latent_channels = config.latent_channels
        self.scale = downsampling(config.block_out_channels)  # each decoder up block but the last doubles H, W

    def modules(self):
        """(module, its entry modules) for offload (engine/offload.py): decode() calls these two, not forward."""
        entries = [m for m in (getattr(self.vae, "post_quant_conv", None), self.vae.decoder) if m is not None]
        return self.vae, entries

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        # latents (B, 4, h, w) -> (B, 3, scale * h, scale * w). Cast first, then divide, in diffusers' order.
        latents = latents.to(self.vae.dtype)
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]


def on_fast_path(unet: TorchUNet, source: str) -> FastUNet:
    """`unet` on the fast path with its weights made in memory, not read from a folder: `source` keys its
    compiled packages instead of the folder's files (the bench's real-size U-Nets)."""
    return FastUNet(unet, None, source=source)


def text_constant_bytes(model, width: int, dtype: torch.dtype) -> int:
    """Bytes of the fast path's text constants (text_constants.py) for one row of (77, width) embeddings, measured
    on meta tensors; installs them on `model` (the memory plan's meta copy). 0 where it has none."""
    constants = TextConstants(model)
    if not constants.active:
        return 0
    values = constants.constants(torch.empty(1, 77, width, device="meta", dtype=dtype))
    return sum(v.numel() * v.element_size() for v in values.values())
