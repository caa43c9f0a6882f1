"""Real-size cascade components with random weights, built fast: on the meta device (no memory, no init), cast,
then `to_empty` on the target device (one uninitialised allocation) and a random init in place.

    if-i-xl:random         IF-I-XL U-Net (4.3B parameters), 64 px
    if-ii-l:random         IF-II-L U-Net (1.2B), 64 -> 256 px
    sd-x4-upscaler:random  the x4 upscaler's U-Net (473M), VAE (55M) and CLIP text encoder (340M), 256 -> 1024 px
    t5-xxl:random          T5-v1.1-XXL encoder (4.8B), 77 tokens
    if-cascade:random      DeepFloyd's published cascade (T5-XXL, IF-I-XL, IF-II-L) as our Pipeline, its models
                           made in device memory (`load_cascade`): timed whole, no weights written to disk

The architectures are engine/configs/real_size.json (the published configs, with the parameter counts checked
against them and the FLOPs per forward, which this module reads too). `NAME:tiny` builds the same architecture scaled down
(TINY_OVERRIDES: fewer and narrower layers, smaller images) so tests run the same code path on a CPU in seconds.
Random weights time like real ones; they make noise, not pictures.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from engine.assemble import build_pipeline
from engine.backends.attention import resolve_attention
from engine.backends.torch_backend import TorchComponents, resolve_fast, text_dtype
from engine.bench.components import fresh_copy
from engine.loading import load, resolve_device, resolve_dtype
from engine.model_dir import load_tokenizer, read_stages, stage_dirs, text_config
from engine.options import STAGE_DEFAULTS
from engine.plan import PlanPart
from engine.schedules import NAMED_SCHEDULES
from engine.testing.random_models import build_tokenizer
from engine.testing.reference import if_pipes

CONFIGS_FILE = Path(__file__).resolve().parents[1] / "configs" / "real_size.json"
SIZES = ("random", "tiny")  # NAME:random is the real size, NAME:tiny the scaled-down one


@lru_cache(maxsize=1)
def reference() -> dict:
    """engine/configs/real_size.json: architectures, schedulers, parameter counts and FLOPs."""
    return json.loads(CONFIGS_FILE.read_text())


@dataclass(frozen=True)
class Part:
    """One component of a real-size model: what to build, how it is called, and its reference figures."""

    name: str  # shown in the table
    config_key: str  # key in real_size.json
    kind: str  # "unet" | "vae_decode" | "t5" | "clip"
    flops_key: str | None  # key in flops_and_params; its "flops_b1" (or "flops_77tok" / "decode_flops_...")
    params_key: str | None
    flops_field: str = "flops_b1"
    size: int | None = None  # side of the input: pixels (IF U-Nets) or latents (x4 U-Net and VAE)
    unit: str = "px"  # what `size` counts, for the table


# The x4 upscaler as stage III of the IF cascade: 256 px in, 1024 px out, so 256x256 latents (at 128 the
# output is 512 px: "SDx4-unet@128latent(512px)" holds that U-Net's FLOPs).
X4_LATENT = 256
MODELS: dict[str, tuple[Part, ...]] = {
    "if-i-xl": (Part("IF-I-XL U-Net step", "IF-I-XL/unet", "unet", "IF-I-XL", "IF-I-XL", size=64),),
    "if-ii-l": (Part("IF-II-L U-Net step", "IF-II-L/unet", "unet", "IF-II-L", "IF-II-L", size=256),),
    "sd-x4-upscaler": (
        Part("x4 U-Net step", "sd-x4-upscaler/unet", "unet", f"SDx4-unet@{X4_LATENT}latent(1024px)",
             "SDx4-unet@256latent(1024px)", size=X4_LATENT, unit="latent"),
        Part("x4 VAE decode", "sd-x4-upscaler/vae", "vae_decode", "SDx4-vae", "SDx4-vae",
             flops_field=f"decode_flops_{X4_LATENT}latent", size=X4_LATENT, unit="latent"),
        Part("x4 CLIP text encoder", "sd-x4-upscaler/text_encoder", "clip",
             "SDx4-text_encoder(CLIP ViT-H text, 23 layers)", "SDx4-text_encoder(CLIP ViT-H text, 23 layers)",
             flops_field="flops_77tok"),
    ),
    "t5-xxl": (Part("T5-XXL encoder", "t5-v1_1-xxl/encoder", "t5", "T5-v1.1-XXL encoder", "T5-v1.1-XXL encoder",
                    flops_field="flops_77tok"),),
}
CASCADES = ("if-cascade",)  # whole cascades, timed through our Pipeline (load_cascade), not part by part
NAMES = tuple(f"{model}:{size}" for size in SIZES for model in (*MODELS, *CASCADES))

# The scaled-down architectures: same block types, embeddings, conditioning and outputs; a CPU runs them in
# milliseconds. Applied on top of the real config.
_TINY_UNET = dict(layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
TINY_OVERRIDES = {
    "IF-I-XL/unet": {**_TINY_UNET, "block_out_channels": [32, 64, 64, 96], "cross_attention_dim": 96,
                     "encoder_hid_dim": 32, "addition_embed_type_num_heads": 2, "sample_size": 16},
    "IF-II-L/unet": {**_TINY_UNET, "block_out_channels": [16, 16, 32, 32, 64], "cross_attention_dim": 64,
                     "encoder_hid_dim": 32, "addition_embed_type_num_heads": 2, "time_embedding_dim": 32,
                     "sample_size": 32},
    # The x4 U-Net's attention_head_dim is its head *count* (an old diffusers convention): 8 real, 2 here.
    "sd-x4-upscaler/unet": {**_TINY_UNET, "attention_head_dim": 2, "block_out_channels": [16, 32, 32, 64],
                            "cross_attention_dim": 32, "sample_size": 16},
    "sd-x4-upscaler/vae": {"block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
                           "sample_size": 64},
    "sd-x4-upscaler/text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                    "num_hidden_layers": 2, "vocab_size": 1000, "projection_dim": 16},
    "t5-v1_1-xxl/encoder": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2,
                            "vocab_size": 1000, "relative_attention_num_buckets": 8,
                            "relative_attention_max_distance": 16},
}
TINY_VAE_LATENT = 8  # tiny U-Nets run at their own (overridden) sample_size


def split_name(name: str) -> tuple[str, str]:
    model, _, size = name.partition(":")
    return model, size


def is_real_size_name(name: str) -> bool:
    return name in NAMES


def is_cascade_name(name: str) -> bool:
    return is_real_size_name(name) and split_name(name)[0] in CASCADES


def parts(name: str) -> tuple[Part, ...]:
    return MODELS[split_name(name)[0]]


def part_config(part: Part, tiny: bool) -> dict:
    config = dict(reference()[part.config_key])
    if tiny:
        config |= TINY_OVERRIDES[part.config_key]
    return config


def input_size(part: Part, config: dict, tiny: bool) -> int | None:
    """Side of the part's input (pixels or latents); None for text encoders (77 tokens)."""
    if part.size is None or not tiny:
        return part.size
    return config["sample_size"] if part.kind == "unet" else TINY_VAE_LATENT


def reference_flops(part: Part, tiny: bool) -> int | None:
    """FLOPs per forward at batch 1 from the shared reference (None for tiny models: count them instead)."""
    if tiny or part.flops_key is None:
        return None
    return int(reference()["flops_and_params"][part.flops_key][part.flops_field])


def reference_params(part: Part) -> int | None:
    return None if part.params_key is None else int(reference()["flops_and_params"][part.params_key]["params"])


def construct(part: Part, config: dict) -> torch.nn.Module:
    """The module for `config`, built wherever the current default device says (meta, in `build`)."""
    if part.kind == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)
    if part.kind == "vae_decode":
        from diffusers import AutoencoderKL

        return AutoencoderKL(**{k: v for k, v in config.items() if k != "scaling_factor"},
                             scaling_factor=config.get("scaling_factor", 0.18215))
    if part.kind == "t5":
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(**config))
    if part.kind == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig(**config))
    raise ValueError(f"unknown part kind {part.kind!r}")


def on_meta(part: Part, tiny: bool = False) -> torch.nn.Module:
    """The architecture on the meta device: shapes only, no memory (IF-I-XL: 4.3B parameters in a second)."""
    with torch.device("meta"):
        return construct(part, part_config(part, tiny))


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter in place: weights ~ N(0, 1/fan_in) (activations keep their scale layer after layer,
    so float16 stays finite), biases 0, other vectors (norm scales) 1. Fast: one kernel per tensor."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            param.normal_(0.0, fan_in**-0.5, generator=generator)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)
    return module


def build(part: Part, device: torch.device, dtype: torch.dtype, tiny: bool = False, seed: int = 0):
    """The part with random weights on `device` in `dtype`: meta -> cast (free) -> to_empty -> random init."""
    return materialize(on_meta(part, tiny), device, dtype, seed)


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A module built on the meta device, made real on `device` in `dtype` with random weights (random_init_)."""
    # torch.nn.Module.to, not diffusers' override (it warns about keep-in-float32 modules these models lack).
    module = torch.nn.Module.to(module, dtype)
    module = module.to_empty(device=device)
    if hasattr(module, "tie_weights"):  # to_empty gives tied weights (T5's embeddings) a tensor each: tie again
        module.tie_weights()
    random_init_(module, seed)
    _init_buffers(module)
    return module.eval().requires_grad_(False)


def _init_buffers(module: torch.nn.Module) -> None:
    """to_empty leaves buffers uninitialised too; the only one these models have is CLIP's position ids."""
    for name, buffer in list(module.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if leaf != "position_ids":
            raise ValueError(f"{type(module).__name__}: no rule to initialise buffer {name}")
        ids = torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer).clone()
        module.get_submodule(owner).register_buffer(leaf, ids, persistent=False)


def real_size_parts(dtype: torch.dtype, x4: bool = False) -> list[PlanPart]:
    """The memory plan's parts (engine/plan.py) of DeepFloyd's published cascade, from its configs (no weights):
    T5-XXL, IF-I-XL (64 px), IF-II-L (256 px), and with x4 the x4 upscaler (256 -> 1024 px)."""
    from transformers import CLIPTextConfig, T5Config

    configs = reference()
    smart27 = len(NAMED_SCHEDULES["smart27"])
    found = [PlanPart("text_encoder", "t5", T5Config(**configs["t5-v1_1-xxl/encoder"]), text_dtype(dtype)),
             PlanPart("stage_I.unet", "unet", configs["IF-I-XL/unet"], dtype, 64, smart27),
             PlanPart("stage_II.unet", "unet", configs["IF-II-L/unet"], dtype, 256, smart27)]
    if x4:
        vae = configs["sd-x4-upscaler/vae"]
        found.insert(1, PlanPart("stage_III.text_encoder", "clip",
                                 CLIPTextConfig(**configs["sd-x4-upscaler/text_encoder"]), dtype))
        found += [PlanPart("stage_III.unet", "unet", configs["sd-x4-upscaler/unet"], dtype, 256,
                           STAGE_DEFAULTS["latent_upscaler"].steps),
                  PlanPart("stage_III.vae", "vae", vae, torch.float32 if dtype == torch.float16 else dtype, 256)]
    return found


def write_cascade(root: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float16,
                  tiny: bool = False, seed: int = 0, weights: bool = True) -> Path:
    """DeepFloyd's published IF cascade (T5-XXL, IF-I-XL, IF-II-L) with random weights, written under `root` in
    DeepFloyd's layout (stage_I, stage_II, cascade.json) with the published scheduler configs, so that the whole
    cascade, ours and diffusers', can be timed at real size without the weights (`python -m engine bench --model
    ROOT`). The weights are made on `device` (fast on a GPU) in `dtype` and saved as safetensors (about 21 GB in
    float16); tiny: the scaled-down architectures, for tests. Random weights make noise, not pictures.
    weights=False writes the configs and the tokenizer only (kilobytes): what `load_cascade` reads, making the
    weights in memory instead."""
    root = Path(root)
    configs = reference()
    stage_i, stage_ii = root / "stage_I", root / "stage_II"
    folders = {"t5-xxl": stage_i / "text_encoder", "if-i-xl": stage_i / "unet", "if-ii-l": stage_ii / "unet"}
    build_tokenizer().save_pretrained(stage_i / "tokenizer")
    for name, folder in folders.items():
        part = MODELS[name][0]
        if weights:
            model = build(part, torch.device(device), dtype, tiny, seed)
            model.save_pretrained(folder, safe_serialization=True)
            del model
        else:  # the config alone, from the architecture on meta (no memory), and what the weights will be
            on_meta(part, tiny).save_config(folder) if part.kind == "unet" else \
                on_meta(part, tiny).config.save_pretrained(folder)
            (folder / RANDOM_WEIGHTS).write_text(json.dumps({"seed": seed, "init": random_init_.__doc__}) + "\n")
    files = {stage_i / "scheduler" / "scheduler_config.json": configs["IF-I-XL/scheduler"],
             stage_ii / "scheduler" / "scheduler_config.json": configs["IF-II-L/scheduler"],
             stage_ii / "image_noising_scheduler" / "scheduler_config.json": configs["IF-II-L/image_noising_scheduler"],
             stage_i / "model_index.json": {
                 "_class_name": "IFPipeline", "text_encoder": ["transformers", "T5EncoderModel"],
                 "tokenizer": ["transformers", "T5Tokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "scheduler": ["diffusers", "DDPMScheduler"]},
             stage_ii / "model_index.json": {
                 "_class_name": "IFSuperResolutionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "scheduler": ["diffusers", "DDPMScheduler"], "image_noising_scheduler": ["diffusers", "DDPMScheduler"]},
             root / "cascade.json": {"stages": ["stage_I", "stage_II"],
                                     "notice": "random weights at real size: for timing, not pictures"}}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
    return root


# Beside each config of a cascade written with weights=False: the seed and the init its weights are made with,
# so that a key over the folder's files (the fast path's compiled packages) changes when they do.
RANDOM_WEIGHTS = "random_weights.json"


class RandomWeights(TorchComponents):
    """The torch backend's components with every model made from its config in memory (`materialize`: random
    weights, on the device, in a second) instead of read from weight files: a cascade written with
    weights=False loads through the same assembly, attention and fast path as any model directory."""

    seed = 0

    def text_encoder(self, stage):
        from transformers import T5EncoderModel

        config = text_config(stage.directory / "text_encoder")
        with torch.device("meta"):
            model = T5EncoderModel(config)
        model = materialize(model, self.home, text_dtype(self.dtype), self.seed)
        return load_tokenizer(stage.directory), model, model.config.d_model

    def _diffusers(self, cls, folder, what: str, dtype: torch.dtype):
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(folder))
        return materialize(model, self.home, dtype, self.seed)


def load_cascade(name: str, device: torch.device, dtype: torch.dtype, fast: bool | None = None,
                 attention: str | None = None, root: str | Path | None = None):
    """Our Pipeline over the published cascade of `name` (CASCADES, :random or :tiny), its models made in device
    memory: the configs and tokenizer are written under `root` (default: a new temporary folder), never the
    weights (21 GB in float16 that a fresh GPU machine would spend a minute and a half writing)."""
    if not is_cascade_name(name):
        raise ValueError(f"not a real-size cascade: {name!r} (one of {', '.join(n for n in NAMES if is_cascade_name(n))})")
    root = Path(root or tempfile.mkdtemp(prefix=f"{split_name(name)[0]}-"))  # kilobytes; reference_pipes reads it
    write_cascade(root, tiny=split_name(name)[1] == "tiny", weights=False)
    cascade = stage_dirs([root])
    components = RandomWeights(device, dtype, resolve_attention(attention, device), fast=resolve_fast(fast, device))
    return build_pipeline(read_stages(cascade), components, source=f"{name} ({root})", notice=cascade.notice)


def reference_pipes(pipe, root: str | Path, dtype: torch.dtype):
    """diffusers' IFPipeline + IFSuperResolutionPipeline over the weights of `load_cascade(..., root=root)`'s
    pipeline, as a diffusers user runs them: plain modules (diffusers' attention processors, contiguous weights:
    copies, since ours changed theirs) and T5 in the U-Nets' dtype (DeepFloyd's float16 variant)."""
    root = Path(root)
    return if_pipes(root / "stage_I", root / "stage_II", fresh_copy(pipe.text.model, dtype),
                    *(fresh_copy(stage.unet.model) for stage in pipe.stages), device=str(pipe.device))


def load_model(name: str, device=None, dtype=None, fast: bool | None = None, attention: str | None = None):
    """engine.load(name, ...), or `load_cascade` where `name` is a real-size cascade (if-cascade:random): what the
    bench scripts that time whole images take as --model."""
    if not is_cascade_name(name):
        return load(name, device=device, dtype=dtype, fast=fast, attention=attention)
    device = resolve_device(device)
    return load_cascade(name, device, resolve_dtype(dtype, device), fast=fast, attention=attention)
