"""Loading cascades from diffusers-format directories into a Pipeline.

Accepted: stage directories as DeepFloyd publishes them, in cascade order (stage I: text_encoder/, tokenizer/,
unet/, scheduler/; stage II: unet/, scheduler/, image_noising_scheduler/), optionally followed by Stability's
x4 upscaler as stabilityai/stable-diffusion-x4-upscaler ships it (unet/, vae/, text_encoder/, tokenizer/,
scheduler/, low_res_scheduler/), a directory whose cascade.json lists its stages (`{"stages": ["stage_I",
"stage_II", "stage_III"]}`, relative paths), or the name of a packaged model.
Weights are read from .safetensors only, never from pickle files. Anything wrong raises ModelError naming the
path and the problem, before a U-Net is built where possible.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from engine.backends import BACKENDS
from engine.backends.attention import ATTENTION_CHOICES, triton_available
from engine.errors import InvalidRequestError, ModelError
from engine.options import StageDefaults
from engine.pipeline import Pipeline
from engine.samplers import SCHEDULER_CLASSES
from engine.schedules import NoiseSchedule
from engine.stage import IMAGE_CHANNELS, LatentUpscaleStage, Stage
from engine.text import TextEncoder

log = logging.getLogger(__name__)

PACKAGED_ROOT = Path(__file__).parent / "models"
DEFAULT_MODEL = "shapes"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
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
    """float32 on CPU and float16 on CUDA by default."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidRequestError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def text_dtype(dtype: torch.dtype) -> torch.dtype:
    """T5 overflows in float16: it runs in bfloat16 instead (or float32 when everything does)."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def load(*paths: str | Path, backend: str | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, attention: str | None = None, providers=None) -> Pipeline:
    """A Pipeline for a cascade on disk (stage dirs in order, a dir with cascade.json), a packaged model name,
    or a directory exported by `python -m engine export`.

    backend: "torch" (the default for model directories), or "onnxruntime" (the default, and the only choice,
    for an exported directory; for a model directory it exports into the cache on first use, see export/cache.py).
    attention (torch only): "triton" (our kernel; the default on CUDA when Triton is installed) or "sdpa".
    providers (onnxruntime only): ONNX Runtime execution providers; default CUDA when usable, else CPU.
    """
    if backend is not None and backend not in BACKENDS:
        raise InvalidRequestError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    exported = _exported_dir(paths)
    if exported is not None or backend == "onnxruntime":
        if attention is not None:
            raise InvalidRequestError("attention= applies to the torch backend only; the onnxruntime backend "
                                      "runs the attention the exported graph holds")
        if backend == "torch":
            raise InvalidRequestError(f"{exported} is an ONNX export; load it with backend='onnxruntime' (or "
                                      "no backend), or load the original model directory with backend='torch'")
        return _load_onnxruntime(paths, exported, device, dtype, providers)
    if providers is not None:
        raise InvalidRequestError("providers= applies to the onnxruntime backend only")
    device = resolve_device(device)
    attention = _resolve_attention(attention, device)
    dtype = resolve_dtype(dtype, device)
    dirs, notice, source, defaults = stage_dirs(paths)
    first = dirs[0]
    if is_x4_upscaler(first):  # alone: an upscaler of the images passed to generate(image=...)
        if len(dirs) > 1:
            raise ModelError(first, "an x4 upscaler stage is the last stage of a cascade; list it after the IF "
                                    "stages, e.g. engine.load(IF_I_DIR, IF_II_DIR, X4_DIR), or load it alone")
        stage = _load_x4_stage(first, "stage_I", device, dtype, attention)
        apply_defaults([stage], defaults, first)
        return Pipeline(stage.text, [stage], device, dtype, source=source, notice=notice)
    for sub in ("tokenizer", "text_encoder"):
        if not (first / sub).is_dir():
            raise ModelError(first, f"the first stage needs {sub}/ (a base stage as IF-I ships it); "
                                    "is a super-resolution stage listed first?")
    text = _load_text_encoder(first, device, dtype)
    stages = [_load_stage(d, i, text.dim, device, dtype, attention) for i, d in enumerate(dirs)]
    apply_defaults(stages, defaults, first.parent)
    return Pipeline(text, stages, device, dtype, source=source, notice=notice)


def _exported_dir(paths) -> Path | None:
    """The directory if `paths` is one directory exported by `python -m engine export`, else None."""
    from export.manifest import is_exported

    if len(paths) == 1 and isinstance(paths[0], (str, Path)):
        path = Path(paths[0]).expanduser()
        if is_exported(path):
            return path
    return None


def _load_onnxruntime(paths, exported: Path | None, device, dtype, providers) -> Pipeline:
    from engine.backends.onnxruntime_backend import load_exported
    from export.cache import cached_export

    device = resolve_device(device)
    if providers is None and device.type == "cpu":
        providers = ["CPUExecutionProvider"]
    if exported is None:
        dtype = resolve_dtype(dtype, device)
        if dtype == torch.bfloat16:
            raise InvalidRequestError("the onnxruntime backend runs float32 or float16 exports, not bfloat16")
        exported = cached_export(*paths, dtype=str(dtype).removeprefix("torch."))
    elif dtype is not None:
        raise InvalidRequestError(f"{exported} was exported in a fixed precision (see its manifest.json); "
                                  "dtype= cannot change it: export again with --dtype")
    return load_exported(exported, providers=providers)


def stage_dirs(paths) -> tuple[list[Path], str | None, str, list]:
    """(stage dirs, the model's notice, what to call it, one defaults override per stage or None)."""
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
        if not path.is_dir():
            known = ", ".join(packaged_models()) or "none"
            raise ModelError(p, f"no such model directory (packaged models: {known})")
        resolved.append(path)
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


def _read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise ModelError(file.parent, f"missing {file.name} ({what})")
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(file, f"corrupt {what}: {exc}") from exc


def _weights_variant(folder: Path, dtype: torch.dtype, loader: str) -> str | None:
    """'fp16' to load the fp16 weight files, None for the full-precision ones; refuses pickle-only folders."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    safetensors = [n for n in names if n.endswith(".safetensors")]
    if not safetensors:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            module, cls = loader.rsplit(".", 1)
            raise ModelError(folder, f"only pickle weights ({', '.join(sorted(pickles))}); this engine reads "
                                     f".safetensors only, never pickle. Convert once, if you trust the source: "
                                     f"python -c \"from {module} import {cls} as M; "
                                     f"M.from_pretrained('{folder}').save_pretrained('{folder}', "
                                     f"safe_serialization=True)\"")
        raise ModelError(folder, "no .safetensors weight files")
    has_fp16 = any(".fp16." in n for n in safetensors)
    has_full = any(".fp16." not in n for n in safetensors)
    if has_fp16 and (dtype != torch.float32 or not has_full):
        return "fp16"
    return None


def is_x4_upscaler(stage_dir: Path) -> bool:
    """Whether a stage directory holds Stability's x4 upscaler: a latent stage, the only kind with a vae/."""
    return (stage_dir / "vae").is_dir()


def _load_text_encoder(stage_dir: Path, device: torch.device, dtype: torch.dtype, clip: bool = False) -> TextEncoder:
    """IF's T5 encoder (bfloat16 where the U-Nets run float16), or with clip=True the x4 upscaler's CLIP."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    cls, as_dtype = (CLIPTextModel, dtype) if clip else (T5EncoderModel, text_dtype(dtype))
    folder = stage_dir / "text_encoder"
    _read_json(folder / "config.json", "text encoder config")
    variant = _weights_variant(folder, dtype, f"transformers.{cls.__name__}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(stage_dir / "tokenizer")
    except Exception as exc:  # transformers raises many types for a bad tokenizer folder
        raise ModelError(stage_dir / "tokenizer", f"cannot load the tokenizer: {exc}") from exc
    try:
        model = cls.from_pretrained(folder, use_safetensors=True, variant=variant, dtype=as_dtype)
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
                attention: str) -> Stage:
    from diffusers import UNet2DConditionModel

    from engine.backends.torch_backend import TorchUNet

    name = f"stage_{'I' * (index + 1)}" if index < 3 else f"stage_{index + 1}"
    if is_x4_upscaler(stage_dir):
        return _load_x4_stage(stage_dir, name, device, dtype, attention)
    config = _read_json(stage_dir / "unet" / "config.json", "U-Net config")
    scheduler = _read_json(stage_dir / "scheduler" / "scheduler_config.json", "scheduler config")
    in_ch, out_ch = config.get("in_channels"), config.get("out_channels")
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
    wants = config.get("encoder_hid_dim") if config.get("encoder_hid_dim_type") else config.get("cross_attention_dim")
    if wants != text_dim:
        raise ModelError(stage_dir, f"the U-Net expects text embeddings of width {wants} but the text encoder "
                                    f"produces {text_dim}: these stages do not belong to one cascade")
    noising = None
    if index > 0:
        noising_config = _read_json(stage_dir / "image_noising_scheduler" / "scheduler_config.json",
                                    "image-noising scheduler config of a super-resolution stage")
        noising = _schedule(noising_config, stage_dir / "image_noising_scheduler")
    _schedule(scheduler, stage_dir / "scheduler")
    folder = stage_dir / "unet"
    variant = _weights_variant(folder, dtype, "diffusers.UNet2DConditionModel")
    try:
        model = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, variant=variant, torch_dtype=dtype)
    except Exception as exc:
        raise ModelError(folder, f"cannot load the U-Net weights: {exc}") from exc
    return Stage(name, TorchUNet(model.to(device), attention), scheduler, noising, device, dtype)


def _load_x4_stage(stage_dir: Path, name: str, device: torch.device, dtype: torch.dtype, attention: str) -> Stage:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from engine.backends.torch_backend import TorchUNet, TorchVAEDecoder

    config = _read_json(stage_dir / "unet" / "config.json", "U-Net config")
    vae_config = _read_json(stage_dir / "vae" / "config.json", "VAE config")
    scheduler = _read_json(stage_dir / "scheduler" / "scheduler_config.json", "scheduler config")
    low_res = _read_json(stage_dir / "low_res_scheduler" / "scheduler_config.json", "low-res noising scheduler config")
    pipeline_config = _read_json(stage_dir / "model_index.json", "pipeline config") \
        if (stage_dir / "model_index.json").is_file() else {}
    latent = vae_config.get("latent_channels", 4)
    if config.get("in_channels") != latent + IMAGE_CHANNELS:
        raise ModelError(stage_dir, f"the x4 U-Net takes {config.get('in_channels')} channels; expected "
                                    f"{latent + IMAGE_CHANNELS} ({latent} latent + {IMAGE_CHANNELS} image)")
    if config.get("out_channels") != latent:
        raise ModelError(stage_dir, f"the x4 U-Net predicts {config.get('out_channels')} channels; expected the "
                                    f"VAE's {latent} latent channels")
    if config.get("num_class_embeds") is None and config.get("class_embed_type") is None:
        raise ModelError(stage_dir, "the x4 U-Net has no class embedding for the noise level (num_class_embeds)")
    noising = _schedule(low_res, stage_dir / "low_res_scheduler")
    _schedule(scheduler, stage_dir / "scheduler")
    text = _load_text_encoder(stage_dir, device, dtype, clip=True)
    if config.get("cross_attention_dim") != text.dim:
        raise ModelError(stage_dir, f"the x4 U-Net expects text embeddings of width {config.get('cross_attention_dim')} "
                                    f"but its text encoder produces {text.dim}")
    # The VAE overflows in float16: diffusers decodes in float32 when the config says force_upcast (the default).
    vae_dtype = torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype
    models = {}
    for sub, cls, as_dtype in (("unet", UNet2DConditionModel, dtype), ("vae", AutoencoderKL, vae_dtype)):
        folder = stage_dir / sub
        variant = _weights_variant(folder, as_dtype, f"diffusers.{cls.__name__}")
        try:
            models[sub] = cls.from_pretrained(folder, use_safetensors=True, variant=variant, torch_dtype=as_dtype)
        except Exception as exc:
            raise ModelError(folder, f"cannot load the {sub} weights: {exc}") from exc
    return LatentUpscaleStage(
        name, TorchUNet(models["unet"].to(device), attention), TorchVAEDecoder(models["vae"].to(device), attention),
        scheduler, noising, device, dtype, text=text,
        max_noise_level=int(pipeline_config.get("max_noise_level", X4_MAX_NOISE_LEVEL)))


def _schedule(config: dict, where: Path) -> NoiseSchedule:
    cls = config.get("_class_name", "DDPMScheduler")
    if cls not in SCHEDULER_CLASSES:
        raise ModelError(where, f"scheduler {cls} is not supported; supported: {', '.join(SCHEDULER_CLASSES)}")
    try:
        return NoiseSchedule.from_config(config)
    except ValueError as exc:
        raise ModelError(where, str(exc)) from exc
