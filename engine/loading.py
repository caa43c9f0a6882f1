"""Loading cascades from diffusers-format directories into a Pipeline.

Accepted: stage directories as DeepFloyd publishes them, in cascade order (stage I: text_encoder/, tokenizer/,
unet/, scheduler/; stage II: unet/, scheduler/, image_noising_scheduler/), optionally followed by Stability's
x4 upscaler as stabilityai/stable-diffusion-x4-upscaler ships it (unet/, vae/, text_encoder/, tokenizer/,
scheduler/, low_res_scheduler/), each as a path or as a hub id found in the local Hugging Face cache
("DeepFloyd/IF-I-XL-v1.0"); a directory whose cascade.json lists its stages (`{"stages": ["stage_I",
"stage_II", "stage_III"]}`, relative paths); or the name of a packaged model. Configs and weight files are read
as diffusers and transformers read them (engine/model_dir.py); safety_checker/, feature_extractor/ and
watermarker/ are not run. Weights are read from .safetensors only, never from pickle files. Anything wrong
raises ModelError naming the path and the problem, before a U-Net is built where possible.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from pathlib import Path

import torch

from engine.backends import BACKENDS
from engine.backends.attention import ATTENTION_CHOICES, triton_available
from engine.errors import InvalidRequestError, ModelError
from engine.model_dir import (load_tokenizer, looks_like_hub_id, model_config, resolve_hub_id,
                              scheduler_config, text_config, weights_variant)
from engine.options import StageDefaults, closest_name
from engine.pipeline import Pipeline
from engine.schedules import NoiseSchedule
from engine.stage import IMAGE_CHANNELS, LatentUpscaleStage, Stage
from engine.text import TextEncoder

log = logging.getLogger(__name__)

PACKAGED_ROOT = Path(__file__).parent / "demo" / "models"  # the packaged models (engine/demo/models/NAME)
DEFAULT_MODEL = "shapes"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
X4_MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's default, when model_index.json does not say


def packaged_models() -> list[str]:
    return sorted(p.name for p in PACKAGED_ROOT.iterdir() if (p / "cascade.json").is_file())


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidRequestError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' was asked for but PyTorch sees no CUDA GPU "
                                  "(torch.cuda.is_available() is False): use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device {device.type!r} is not supported: use 'cpu' or 'cuda'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU and float16 on CUDA by default; a half precision on CPU is allowed, with a warning."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        resolved = dtype
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        resolved = DTYPES[dtype.removeprefix("torch.")]
    else:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device.type == "cpu" and resolved != torch.float32:
        warnings.warn(f"{str(resolved).removeprefix('torch.')} on CPU runs about 15x slower than float32 (CPUs "
                      "have few half-precision kernels) and is no more exact: use dtype='float32' on CPU",
                      UserWarning, stacklevel=3)
    return resolved


def text_dtype(dtype: torch.dtype) -> torch.dtype:
    """T5 overflows in float16: it runs in bfloat16 instead (or float32 when everything does)."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def load(*paths: str | Path, backend: str | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, attention: str | None = None, providers=None,
         revision: str | None = None, variant: str | None = None, torch_dtype: str | torch.dtype | None = None,
         **unknown) -> Pipeline:
    """A Pipeline for a cascade on disk (stage dirs in order, a dir with cascade.json), hub ids of snapshots in
    the local Hugging Face cache, a packaged model name, or a directory exported by `python -m engine export`.

    backend: "torch" (the default for model directories), or "onnxruntime" (the default, and the only choice,
    for an exported directory; for a model directory it exports into the cache on first use, see export/cache.py).
    dtype (or diffusers' name, torch_dtype): float32 (CPU default), float16 (CUDA default) or bfloat16.
    variant: "fp16" reads the fp16 weight files of every component; None (default) picks them by dtype.
    revision: of hub ids, a branch, tag or commit in the local cache (default: main).
    attention (torch only): "triton" (our kernel; the default on CUDA when Triton is installed) or "sdpa".
    providers (onnxruntime only): ONNX Runtime execution providers; default CUDA when usable, else CPU.
    """
    if unknown:
        name = sorted(unknown)[0]
        known = [p for p in inspect.signature(load).parameters if p not in ("paths", "unknown")]
        raise InvalidRequestError(f"unknown argument {name!r} to engine.load{closest_name(name, known)}")
    if torch_dtype is not None:
        if dtype is not None:
            raise InvalidRequestError("give dtype= or torch_dtype= (its diffusers name), not both")
        dtype = torch_dtype
    if backend is not None and backend not in BACKENDS:
        raise InvalidRequestError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if variant is not None and not isinstance(variant, str):
        raise InvalidRequestError(f"variant must be a string such as 'fp16', got {variant!r}")
    exported = _exported_dir(paths)
    if exported is not None or backend == "onnxruntime":
        if attention is not None:
            raise InvalidRequestError("attention= applies to the torch backend only; the onnxruntime backend "
                                      "runs the attention the exported graph holds")
        if variant is not None:
            raise InvalidRequestError("variant= applies to the torch backend only; the onnxruntime backend "
                                      "exports with the weight files the dtype picks")
        if backend == "torch":
            raise InvalidRequestError(f"{exported} is an ONNX export; load it with backend='onnxruntime' (or "
                                      "no backend), or load the original model directory with backend='torch'")
        return _load_onnxruntime(paths, exported, device, dtype, providers, revision)
    if providers is not None:
        raise InvalidRequestError("providers= applies to the onnxruntime backend only")
    device = resolve_device(device)
    attention = _resolve_attention(attention, device)
    dtype = resolve_dtype(dtype, device)
    dirs, notice, source, defaults = stage_dirs(paths, revision)
    first = dirs[0]
    if is_x4_upscaler(first):  # alone: an upscaler of the images passed to generate(image=...)
        if len(dirs) > 1:
            raise ModelError(first, "an x4 upscaler stage is the last stage of a cascade; list it after the IF "
                                    "stages, e.g. engine.load(IF_I_DIR, IF_II_DIR, X4_DIR), or load it alone")
        stage = _load_x4_stage(first, "stage_I", device, dtype, attention, variant)
        apply_defaults([stage], defaults, first)
        return Pipeline(stage.text, [stage], device, dtype, source=source, notice=notice)
    for sub in ("tokenizer", "text_encoder"):
        if not (first / sub).is_dir():
            raise ModelError(first, f"the first stage needs {sub}/ (a base stage as IF-I ships it); "
                                    "is a super-resolution stage listed first?")
    text = _load_text_encoder(first, device, dtype, variant=variant)
    stages = [_load_stage(d, i, text.dim, device, dtype, attention, variant) for i, d in enumerate(dirs)]
    apply_defaults(stages, defaults, first.parent)
    return Pipeline(text, stages, device, dtype, source=source, notice=notice)


def _exported_dir(paths) -> Path | None:
    """The directory if `paths` is one directory exported by `python -m engine export`, else None."""
    from export.manifest import is_exported

    if len(paths) == 1 and isinstance(paths[0], (str, Path)):
        path = Path(paths[0]).expanduser().resolve()
        if is_exported(path):
            return path
        if path.is_dir() and not (path / "cascade.json").is_file() and any(path.glob("**/*.onnx")):
            raise ModelError(path, "holds ONNX graphs but no manifest.json: an interrupted export or a partial "
                                   "copy? Export again with `python -m engine export MODEL --out DIR`")
    return None


def _load_onnxruntime(paths, exported: Path | None, device, dtype, providers, revision) -> Pipeline:
    from engine.backends.onnxruntime_backend import load_exported
    from export.cache import cached_export

    device = resolve_device(device)
    if providers is None and device.type == "cpu":
        providers = ["CPUExecutionProvider"]
    if exported is None:
        dtype = resolve_dtype(dtype, device)
        if dtype == torch.bfloat16:
            raise InvalidRequestError("the onnxruntime backend runs float32 or float16 exports, not bfloat16")
        exported = cached_export(*stage_dirs(paths, revision)[0] if revision else paths,
                                 dtype=str(dtype).removeprefix("torch."))
    elif dtype is not None:
        raise InvalidRequestError(f"{exported} was exported in a fixed precision (see its manifest.json); "
                                  "dtype= cannot change it: export again with --dtype")
    return load_exported(exported, providers=providers)


def stage_dirs(paths, revision: str | None = None) -> tuple[list[Path], str | None, str, list]:
    """(stage dirs, the model's notice, what to call it, one defaults override per stage or None).

    Each path is a directory (relative to the working directory, or absolute), a packaged model name, or a
    hub id looked up in the local Hugging Face cache at `revision`."""
    if not paths:
        raise InvalidRequestError("engine.load() needs at least one path or packaged model name, "
                                  f"e.g. engine.load({DEFAULT_MODEL!r})")
    for p in paths:
        if not isinstance(p, (str, Path)):
            raise InvalidRequestError(f"model paths must be strings or paths, got {type(p).__name__}")
    resolved = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists() and isinstance(p, str) and (PACKAGED_ROOT / p / "cascade.json").is_file():
            path = PACKAGED_ROOT / p
        elif not path.exists() and isinstance(p, str) and looks_like_hub_id(p):
            path = resolve_hub_id(p, revision)
            log.info("%s: the local Hugging Face cache's snapshot at %s", p, path)
        if not path.is_dir():
            known = ", ".join(packaged_models()) or "none"
            raise ModelError(p, f"no such model directory (packaged models: {known}; hub ids are ORG/NAME)")
        resolved.append(path.resolve())
    if len(resolved) == 1 and (resolved[0] / "cascade.json").is_file():
        dirs, notice, defaults = _read_cascade(resolved[0])
        return dirs, notice, str(paths[0]), defaults
    return resolved, None, ", ".join(str(p) for p in paths), [None] * len(resolved)


def _read_cascade(root: Path) -> tuple[list[Path], str | None, list]:
    file = root / "cascade.json"
    try:
        spec = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(file, f"cannot read cascade.json: {exc}") from exc
    stages = spec.get("stages") if isinstance(spec, dict) else None
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        raise ModelError(file, 'cascade.json must hold {"stages": ["stage_I", "stage_II", ...]} '
                               "(stage directories relative to it, in cascade order)")
    dirs = [(root / s).resolve() for s in stages]
    for d in dirs:
        if not d.is_dir():
            raise ModelError(d, "stage directory listed in cascade.json does not exist")
    # A model's own generation defaults, by stage directory: {"defaults": {"stage_II": {"steps": 20, ...}}}.
    defaults = spec.get("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) - set(stages):
        raise ModelError(file, f'cascade.json "defaults" must map stage directories ({", ".join(stages)}) to '
                               '{"steps": ..., "guidance": ..., "noise_level": ...}')
    return dirs, spec.get("notice"), [defaults.get(s) for s in stages]


def apply_defaults(stages: list[Stage], overrides: list, where: Path) -> None:
    """Give each stage its model's own defaults (None: keep its kind's); ModelError names a bad entry."""
    for stage, override in zip(stages, overrides):
        try:
            stage.defaults = StageDefaults.for_stage(stage.kind, override)
        except InvalidRequestError as exc:
            raise ModelError(where, f"{stage.name}'s defaults: {exc}") from exc


def is_x4_upscaler(stage_dir: Path) -> bool:
    """Whether a stage directory holds Stability's x4 upscaler: a latent stage, the only kind with a vae/."""
    return (stage_dir / "vae").is_dir()


def _load_text_encoder(stage_dir: Path, device: torch.device, dtype: torch.dtype, clip: bool = False,
                       variant: str | None = None) -> TextEncoder:
    """IF's T5 encoder (bfloat16 where the U-Nets run float16), or with clip=True the x4 upscaler's CLIP."""
    from transformers import CLIPTextModel, T5EncoderModel

    cls, as_dtype = (CLIPTextModel, dtype) if clip else (T5EncoderModel, text_dtype(dtype))
    folder = stage_dir / "text_encoder"
    config = text_config(folder)
    chosen = weights_variant(folder, dtype, f"transformers.{cls.__name__}", variant)
    tokenizer = load_tokenizer(stage_dir)
    try:
        model = cls.from_pretrained(folder, config=config, use_safetensors=True, variant=chosen, dtype=as_dtype)
    except Exception as exc:
        raise ModelError(folder, f"cannot load the {'CLIP' if clip else 'T5'} encoder weights: {exc}") from exc
    dim = model.config.hidden_size if clip else model.config.d_model
    return TextEncoder(tokenizer, model.to(device).eval(), device, output_dtype=dtype, dim=dim, clip=clip)


def _resolve_attention(attention: str | None, device: torch.device) -> str:
    if attention is None:
        return "triton" if device.type == "cuda" and triton_available() else "sdpa"
    if attention not in ATTENTION_CHOICES:
        raise InvalidRequestError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    if attention == "triton" and not triton_available():
        raise InvalidRequestError("attention='triton' needs Triton: pip install 'cascade-engine[triton]'")
    return attention


def _load_stage(stage_dir: Path, index: int, text_dim: int, device: torch.device, dtype: torch.dtype,
                attention: str, variant: str | None = None) -> Stage:
    from diffusers import UNet2DConditionModel

    from engine.backends.torch_backend import TorchUNet

    name = f"stage_{'I' * (index + 1)}" if index < 3 else f"stage_{index + 1}"
    if is_x4_upscaler(stage_dir):
        return _load_x4_stage(stage_dir, name, device, dtype, attention, variant)
    folder = stage_dir / "unet"
    config = model_config(folder, "UNet2DConditionModel", "U-Net config")  # diffusers' defaults and fallbacks applied
    scheduler = scheduler_config(stage_dir / "scheduler")
    in_ch, out_ch = config["in_channels"], config["out_channels"]
    if index == 0 and in_ch != IMAGE_CHANNELS:
        raise ModelError(stage_dir, f"the first stage must be a base stage with a {IMAGE_CHANNELS}-channel "
                                    f"U-Net input; this U-Net takes {in_ch} channels (a super-resolution stage "
                                    "listed first?)")
    if index > 0 and in_ch != 2 * IMAGE_CHANNELS:
        raise ModelError(stage_dir, f"stages after the first must be super-resolution stages with a "
                                    f"{2 * IMAGE_CHANNELS}-channel U-Net input (x_t + upsampled image); "
                                    f"this U-Net takes {in_ch}")
    if out_ch not in (IMAGE_CHANNELS, 2 * IMAGE_CHANNELS):
        raise ModelError(stage_dir, f"U-Net out_channels={out_ch}; expected {IMAGE_CHANNELS} (eps) or "
                                    f"{2 * IMAGE_CHANNELS} (eps + learned variance)")
    if scheduler.get("variance_type") in ("learned", "learned_range") and out_ch != 2 * IMAGE_CHANNELS:
        raise ModelError(stage_dir, f"the scheduler wants a learned variance but the U-Net has only "
                                    f"{out_ch} output channels")
    wants = text_width(config)
    if wants != text_dim:
        raise ModelError(stage_dir, f"the U-Net expects text embeddings of width {wants} but the text encoder "
                                    f"produces {text_dim}: these stages do not belong to one cascade")
    noising = None
    if index > 0:
        if not (stage_dir / "image_noising_scheduler").is_dir():
            raise ModelError(stage_dir, "missing image_noising_scheduler/ (the image-noising scheduler of a "
                                        "super-resolution stage)")
        noising_dir = stage_dir / "image_noising_scheduler"
        noising = _schedule(scheduler_config(noising_dir, "image-noising scheduler config of a super-resolution "
                                                          "stage"), noising_dir)
    _schedule(scheduler, stage_dir / "scheduler")
    chosen = weights_variant(folder, dtype, "diffusers.UNet2DConditionModel", variant)
    try:
        model = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, variant=chosen, torch_dtype=dtype)
    except Exception as exc:
        raise ModelError(folder, f"cannot load the U-Net weights: {exc}") from exc
    return Stage(name, TorchUNet(model.to(device), attention), scheduler, noising, device, dtype)


def text_width(unet_config: dict) -> int:
    """The width of the text embeddings a resolved U-Net config takes: encoder_hid_dim where the U-Net
    projects them (IF's text_proj), else cross_attention_dim."""
    if unet_config.get("encoder_hid_dim_type") is not None:
        return unet_config["encoder_hid_dim"]
    return unet_config["cross_attention_dim"]


def _load_x4_stage(stage_dir: Path, name: str, device: torch.device, dtype: torch.dtype, attention: str,
                   variant: str | None = None) -> Stage:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from engine.backends.torch_backend import TorchUNet, TorchVAEDecoder
    from engine.model_dir import _read_json

    config = model_config(stage_dir / "unet", "UNet2DConditionModel", "U-Net config")
    vae_config = model_config(stage_dir / "vae", "AutoencoderKL", "VAE config")
    scheduler = scheduler_config(stage_dir / "scheduler", default_class="DDIMScheduler")
    if not (stage_dir / "low_res_scheduler").is_dir():
        raise ModelError(stage_dir, "missing low_res_scheduler/ (the low-res noising scheduler config of the "
                                    "x4 upscaler)")
    low_res = scheduler_config(stage_dir / "low_res_scheduler", "low-res noising scheduler config")
    pipeline_config = _read_json(stage_dir / "model_index.json", "pipeline config") \
        if (stage_dir / "model_index.json").is_file() else {}
    latent = vae_config["latent_channels"]
    if config["in_channels"] != latent + IMAGE_CHANNELS:
        raise ModelError(stage_dir, f"the x4 U-Net takes {config['in_channels']} channels; expected "
                                    f"{latent + IMAGE_CHANNELS} ({latent} latent + {IMAGE_CHANNELS} image)")
    if config["out_channels"] != latent:
        raise ModelError(stage_dir, f"the x4 U-Net predicts {config['out_channels']} channels; expected the "
                                    f"VAE's {latent} latent channels")
    if config.get("num_class_embeds") is None and config.get("class_embed_type") is None:
        raise ModelError(stage_dir, "the x4 U-Net has no class embedding for the noise level (num_class_embeds)")
    noising = _schedule(low_res, stage_dir / "low_res_scheduler")
    _schedule(scheduler, stage_dir / "scheduler")
    text = _load_text_encoder(stage_dir, device, dtype, clip=True, variant=variant)
    if text_width(config) != text.dim:
        raise ModelError(stage_dir, f"the x4 U-Net expects text embeddings of width {text_width(config)} "
                                    f"but its text encoder produces {text.dim}")
    # The VAE overflows in float16: diffusers decodes in float32 when the config says force_upcast (the default).
    vae_dtype = torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype
    models = {}
    for sub, cls, as_dtype in (("unet", UNet2DConditionModel, dtype), ("vae", AutoencoderKL, vae_dtype)):
        folder = stage_dir / sub
        # The variant follows the stage's dtype, not the VAE's upcast one, as diffusers' variant= does.
        chosen = weights_variant(folder, dtype, f"diffusers.{cls.__name__}", variant)
        try:
            models[sub] = cls.from_pretrained(folder, use_safetensors=True, variant=chosen, torch_dtype=as_dtype)
        except Exception as exc:
            raise ModelError(folder, f"cannot load the {sub} weights: {exc}") from exc
    return LatentUpscaleStage(
        name, TorchUNet(models["unet"].to(device), attention), TorchVAEDecoder(models["vae"].to(device), attention),
        scheduler, noising, device, dtype, text=text,
        max_noise_level=int(pipeline_config.get("max_noise_level", X4_MAX_NOISE_LEVEL)))


def _schedule(config: dict, where: Path) -> NoiseSchedule:
    """The noise schedule of a scheduler config (as model_dir.scheduler_config resolves it)."""
    try:
        return NoiseSchedule.from_config(config)
    except ValueError as exc:
        raise ModelError(where, str(exc)) from exc
