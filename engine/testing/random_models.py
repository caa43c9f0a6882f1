"""IF-architecture cascades with random weights, written to disk in DeepFloyd's diffusers layout.

Used by the tests (tiny models, built in-process and loaded back through `engine.load`), by the benchmark,
and as the starting point of the packaged shapes model (engine/demo/train.py). The U-Nets use IF's block types
(ResnetDownsampleBlock2D, SimpleCrossAttn blocks, text_proj + text addition embedding, learned-range output);
the text encoder is a T5 encoder with a word-level tokenizer built locally with `tokenizers`, so nothing is
downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from engine.model_dir import X4_MAX_NOISE_LEVEL

# The scheduler configs DeepFloyd ships (as engine/configs/real_size.json records them).
IF_I_SCHEDULER = {
    "_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000,
    "variance_type": "learned_range", "prediction_type": "epsilon", "thresholding": True,
    "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5, "clip_sample": True, "clip_sample_range": 1.0,
}
IF_II_SCHEDULER = {**IF_I_SCHEDULER, "sample_max_value": 1.0}
IF_II_NOISING_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2",
                           "num_train_timesteps": 1000}
# The x4 upscaler's (stabilityai/stable-diffusion-x4-upscaler): v-prediction DDIM, and the DDPM schedule that
# noises the low-resolution image.
X4_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1,
}
X4_LOW_RES_SCHEDULER = {
    "_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02,
    "num_train_timesteps": 1000, "clip_sample": True, "variance_type": "fixed_small",
}
X4_VAE_SCALING_FACTOR = 0.08333

# Enough words that everyday prompts map to known tokens; unknown words become <unk>.
VOCABULARY = (
    "a an the of on in at with and or to from by for is are this that it its very small large big tiny huge "
    "circle square triangle star heart shape shapes disc ring box cube ball line dot dots "
    "red green blue yellow purple orange white black gray grey pink brown cyan magenta gold silver "
    "background foreground center centre middle left right top bottom corner corners side upper lower "
    "photo picture image painting drawing sketch render photograph illustration art style "
    "cat dog bird fish horse cow tree flower house car boat sky sea sun moon mountain river city street "
    "man woman person child face hand eye portrait beautiful cute dark light bright colorful simple "
    "1 2 3 4 5 6 7 8 9 0 , . ! ? - ' \""
).split()


@dataclass(frozen=True)
class TinyCascadeSpec:
    """Sizes of a random IF-architecture cascade: base U-Net, super-resolution U-Net and T5 encoder."""

    base_size: int = 16
    sr_size: int = 32
    base_channels: tuple[int, ...] = (32, 64)
    sr_channels: tuple[int, ...] = (16, 32)
    cross_attention_dim: int = 64
    head_dim: int = 8
    text_dim: int = 32
    text_layers: int = 2
    output_scale: float = 0.5  # shrinks conv_out so random outputs stay in a sane range over many steps
    layers_per_block: int = 1
    norm_groups: tuple[int, int] = (8, 8)  # GroupNorm groups of the base and the super-resolution U-Net
    prediction_types: tuple[str, str] = ("epsilon", "epsilon")  # what the two U-Nets predict: IF's eps, or v
    stage_names: tuple[str, str] = field(default=("stage_I", "stage_II"))


def build_tokenizer():
    """A T5-style word-level tokenizer: pad 0, </s> 1, <unk> 2, lower-cased, </s> appended."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in VOCABULARY:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=77)


def build_text_encoder(spec: TinyCascadeSpec, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=spec.text_dim, d_kv=spec.text_dim // 4, d_ff=2 * spec.text_dim,
                      num_layers=spec.text_layers, num_heads=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def unet_config(spec: TinyCascadeSpec, super_resolution: bool) -> dict:
    """IF-I-XL's (or IF-II-L's) U-Net config at tiny size: same block types, embeddings and output."""
    channels = spec.sr_channels if super_resolution else spec.base_channels
    attention_levels = len(channels) - 1 if not super_resolution else 1
    config = dict(
        sample_size=spec.sr_size if super_resolution else spec.base_size,
        in_channels=6 if super_resolution else 3, out_channels=6,  # out: eps (3) + variance interpolation (3)
        layers_per_block=spec.layers_per_block, block_out_channels=channels,
        # Attention only on the lower-resolution levels, as in IF (IF-II-L attends only on its last two).
        down_block_types=["ResnetDownsampleBlock2D"] * (len(channels) - attention_levels)
        + ["SimpleCrossAttnDownBlock2D"] * attention_levels,
        up_block_types=["SimpleCrossAttnUpBlock2D"] * attention_levels
        + ["ResnetUpsampleBlock2D"] * (len(channels) - attention_levels),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.head_dim, encoder_hid_dim=spec.text_dim, encoder_hid_dim_type="text_proj",
        addition_embed_type="text", addition_embed_type_num_heads=2,
        norm_num_groups=spec.norm_groups[1 if super_resolution else 0], act_fn="gelu",
        resnet_time_scale_shift="scale_shift", cross_attention_norm="group_norm",
    )
    if super_resolution:  # IF-II: the noise level enters as a timestep-like class embedding
        config |= dict(class_embed_type="timestep", resnet_skip_time_act=True, time_embedding_act_fn="gelu",
                       mid_block_scale_factor=1.414, resnet_out_scale_factor=1.414)
    return config


def build_unet(spec: TinyCascadeSpec, super_resolution: bool):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_config(spec, super_resolution)).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(spec.output_scale)
    return unet


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_if_cascade(root: str | Path, spec: TinyCascadeSpec = TinyCascadeSpec(), seed: int = 0,
                     notice: str | None = None) -> Path:
    """Write a random two-stage IF cascade under `root` (stage dirs + cascade.json); return `root`."""
    root = Path(root)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(spec, len(tokenizer))
    base, sr = build_unet(spec, False), build_unet(spec, True)
    stage_i, stage_ii = (root / name for name in spec.stage_names)

    tokenizer.save_pretrained(stage_i / "tokenizer")
    text_encoder.save_pretrained(stage_i / "text_encoder", safe_serialization=True)
    base.save_pretrained(stage_i / "unet", safe_serialization=True)
    _write_json(stage_i / "scheduler" / "scheduler_config.json",
                {**IF_I_SCHEDULER, "prediction_type": spec.prediction_types[0]})
    _write_json(stage_i / "model_index.json", {
        "_class_name": "IFPipeline", "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"]})

    sr.save_pretrained(stage_ii / "unet", safe_serialization=True)
    _write_json(stage_ii / "scheduler" / "scheduler_config.json",
                {**IF_II_SCHEDULER, "prediction_type": spec.prediction_types[1]})
    _write_json(stage_ii / "image_noising_scheduler" / "scheduler_config.json", IF_II_NOISING_SCHEDULER)
    _write_json(stage_ii / "model_index.json", {
        "_class_name": "IFSuperResolutionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"], "image_noising_scheduler": ["diffusers", "DDPMScheduler"]})

    cascade = {"stages": list(spec.stage_names)}
    if notice:
        cascade["notice"] = notice
    _write_json(root / "cascade.json", cascade)
    return root


@dataclass(frozen=True)
class TinyUpscalerSpec:
    """Sizes of a random x4-upscaler stage: latent U-Net, VAE (len(vae_channels) - 1 halvings) and CLIP encoder."""

    channels: tuple[int, ...] = (16, 32)
    vae_channels: tuple[int, ...] = (8, 16, 16)  # three blocks: x4, as in the real upscaler
    text_dim: int = 32
    text_layers: int = 2
    head_dim: int = 8
    output_scale: float = 0.5


def build_clip_tokenizer():
    """A real CLIPTokenizer (byte-level BPE, </w> word ends) whose merges spell the VOCABULARY words whole."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols
    vocab = {symbol: i for i, symbol in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges: list[tuple[str, str]] = []
    for word in VOCABULARY:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_clip_text_encoder(spec: TinyUpscalerSpec, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=spec.text_dim, intermediate_size=2 * spec.text_dim,
                            num_hidden_layers=spec.text_layers, num_attention_heads=4, max_position_embeddings=77,
                            hidden_act="gelu", bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                            pad_token_id=vocab_size - 1)
    return CLIPTextModel(config).eval()


def x4_unet_config(spec: TinyUpscalerSpec) -> dict:
    """The x4 upscaler's U-Net config at tiny size: 4 latent + 3 image channels in, noise level as class label."""
    levels = len(spec.channels)
    return dict(
        sample_size=32, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=spec.channels,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"],
        only_cross_attention=[True] * (levels - 1) + [False], cross_attention_dim=spec.text_dim,
        attention_head_dim=spec.head_dim, num_class_embeds=1000, use_linear_projection=True, norm_num_groups=8,
        act_fn="silu",
    )


def build_vae(spec: TinyUpscalerSpec):
    from diffusers import AutoencoderKL

    blocks = len(spec.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=spec.vae_channels,
                         down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
                         layers_per_block=1, norm_num_groups=4, scaling_factor=X4_VAE_SCALING_FACTOR).eval()


def write_x4_upscaler(root: str | Path, spec: TinyUpscalerSpec = TinyUpscalerSpec(), seed: int = 0) -> Path:
    """Write a random x4-upscaler stage in stabilityai/stable-diffusion-x4-upscaler's layout; return `root`."""
    from diffusers import UNet2DConditionModel


    root = Path(root)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = build_clip_text_encoder(spec, len(tokenizer))
    unet = UNet2DConditionModel(**x4_unet_config(spec)).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(spec.output_scale)
    tokenizer.save_pretrained(root / "tokenizer")
    text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    build_vae(spec).save_pretrained(root / "vae", safe_serialization=True)
    _write_json(root / "scheduler" / "scheduler_config.json", X4_SCHEDULER)
    _write_json(root / "low_res_scheduler" / "scheduler_config.json", X4_LOW_RES_SCHEDULER)
    _write_json(root / "model_index.json", {
        "_class_name": "StableDiffusionUpscalePipeline", "max_noise_level": X4_MAX_NOISE_LEVEL,
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"], "low_res_scheduler": ["diffusers", "DDPMScheduler"]})
    return root


def write_three_stage_cascade(root: str | Path, spec: TinyCascadeSpec = TinyCascadeSpec(),
                              upscaler: TinyUpscalerSpec = TinyUpscalerSpec(), seed: int = 0) -> Path:
    """IF-I -> IF-II -> x4 upscaler, random, with cascade.json listing all three; return `root`."""
    root = write_if_cascade(root, spec, seed=seed)
    write_x4_upscaler(root / "stage_III", upscaler, seed=seed + 1)
    _write_json(root / "cascade.json", {"stages": [*spec.stage_names, "stage_III"]})
    return root


# The packaged shapes model's architecture (engine/demo/train.py trains it): IF's layout at 32 -> 128 px, with
# narrower levels so that a training step fits a CPU core (about 0.7 s for 32 base pictures) and a default
# generation fits in 3 s on two cores; the super-resolution U-Net gets a fourth level, so that its one
# attention level runs at 16 px. Few GroupNorm groups: with one or two channels per group, a norm wipes out
# the flat colour of a plain background (a channel's own mean), which is most of what these pictures hold.
# Both predict v, not eps: see engine/demo/train.py.
SHAPES_SPEC = TinyCascadeSpec(base_size=32, sr_size=128, base_channels=(16, 32, 64), sr_channels=(8, 16, 32, 64),
                              cross_attention_dim=64, head_dim=32, text_dim=64, norm_groups=(4, 2),
                              prediction_types=("v_prediction", "v_prediction"))
