"""Model directories read as their owners read them, and the cascade they describe.

- `stage_dirs` turns what `engine.load` was given (directories, a directory with cascade.json, packaged model
  names, hub ids) into stage directories in cascade order; `read_stages` reads and checks each stage's configs
  into a `StageSpec`, before any weight file is opened.

- Hub ids ("DeepFloyd/IF-I-XL-v1.0") resolve to a snapshot of the local Hugging Face cache through
  huggingface_hub's own lookup, local files only: no network call is ever made, whatever HF_HUB_OFFLINE says.
- Configs go through the defaulting of the library that owns them (diffusers for U-Nets, VAEs and schedulers,
  transformers for text encoders), so that configs written by older versions (DeepFloyd's, by diffusers 0.16)
  get today's defaults and backward-compatibility fallbacks. No raw JSON key decides what a model is.
- Weight files are recognised as transformers and diffusers name them: single files and sharded checkpoints
  with their index, full precision and the fp16 variant; pickle files are never read.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from engine.errors import InvalidRequestError, ModelError
from engine.options import Preset
from engine.samplers import SCHEDULER_CLASSES
from engine.stage import IMAGE_CHANNELS

log = logging.getLogger(__name__)

PACKAGED_ROOT = Path(__file__).parent / "demo" / "models"  # the packaged models: engine/demo/models/NAME
DEFAULT_MODEL = "shapes"
X4_MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's default, when model_index.json does not say
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# An organisation/name pair as the Hub spells repository ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# -- what a config may say: no code, bounded sizes
# The configs a model folder holds, read (and checked) before anything is built; tokenizer.json and weight
# indexes are data read by their own checks.
CONFIG_FILES = ("model_index.json", "config.json", "scheduler_config.json", "tokenizer_config.json",
                "special_tokens_map.json", "preprocessor_config.json", "generation_config.json")
MAX_CONFIG_BYTES = 4 << 20  # the largest published IF config (T5's tokenizer_config.json) is about 20 KB
MAX_CONFIG_DEPTH = 12  # real configs nest 3 deep (tokenizer_config.json's added_tokens_decoder), cascade.json 5
# Keys naming a class that transformers or diffusers would look up: it must be one of theirs, never a module in
# the folder. auto_map (transformers) and custom_pipeline (diffusers) name code in the folder: always refused.
REMOTE_CODE_KEYS = ("auto_map", "custom_pipeline")
TRANSFORMERS_CLASS_KEYS = ("architectures", "tokenizer_class", "processor_class", "feature_extractor_type",
                           "image_processor_type")
# The most each size may be: about 4x the largest in any published IF model (engine/configs/real_size.json:
# IF-I-XL, IF-II-L, the x4 upscaler, T5-XXL), so that a config cannot make the engine build (on the meta device)
# or allocate a model no one published. Applied to an int or to each int of a list; a list key's length too.
CONFIG_BOUNDS = {
    # diffusers U-Nets and VAEs
    "layers_per_block": 16,  # IF-II-L: [2, 2, 3, 5, 5]
    "transformer_layers_per_block": 16,  # 1
    "block_out_channels": 16384,  # IF-I-XL: 2816
    "in_channels": 64, "out_channels": 64, "latent_channels": 64,  # 7, 6, 4
    "attention_head_dim": 1024, "num_attention_heads": 256, "addition_embed_type_num_heads": 256,  # 64, 64, 64
    "cross_attention_dim": 16384, "encoder_hid_dim": 16384, "time_embedding_dim": 16384,  # 2816, 4096, 1280
    "projection_class_embeddings_input_dim": 16384, "class_embed_dim": 16384,
    "norm_num_groups": 1024,  # 32
    "num_class_embeds": 100_000,  # x4: 1000
    "sample_size": 8192,  # 256
    # transformers' T5 and CLIP
    "d_model": 16384, "hidden_size": 16384, "projection_dim": 16384,  # 4096, 1024, 512
    "d_ff": 65536, "intermediate_size": 65536,  # 10240, 4096
    "num_layers": 128, "num_decoder_layers": 128, "num_hidden_layers": 128,  # 24, 24, 23
    "num_heads": 256, "d_kv": 1024,  # 64, 64
    "vocab_size": 1_000_000,  # 49408
    "max_position_embeddings": 65536, "n_positions": 65536, "relative_attention_num_buckets": 1024,
    "relative_attention_max_distance": 65536,  # 77, 512, 32, 128
    # schedulers
    "num_train_timesteps": 100_000,  # 1000
}
MAX_CONFIG_LIST = 16  # blocks per U-Net (IF-II-L: 5) and the like; for the CONFIG_BOUNDS keys that hold lists


# -- stage directories ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageDir:
    """One stage's directory and the model's own generation defaults for it (cascade.json "defaults"), if any."""

    path: Path
    defaults: dict | None = None


@dataclass(frozen=True)
class CascadeDirs:
    """What `engine.load`'s paths name: its stages in cascade order and what the model says of itself."""

    stages: list[StageDir]
    notice: str | None  # something the user must know about this model (cascade.json "notice")
    source: str  # what to call it in messages
    presets: dict = field(default_factory=dict)  # name -> Preset (cascade.json "presets")

    @property
    def dirs(self) -> list[Path]:
        return [stage.path for stage in self.stages]

    @property
    def defaults(self) -> list[dict | None]:
        return [stage.defaults for stage in self.stages]


def packaged_models() -> list[str]:
    return sorted(p.name for p in PACKAGED_ROOT.iterdir() if (p / "cascade.json").is_file())


def stage_dirs(paths, revision: str | None = None) -> CascadeDirs:
    """The cascade at `paths`: each a directory (relative to the working directory, or absolute), a packaged
    model name, or a hub id looked up in the local Hugging Face cache at `revision`; one directory may hold a
    cascade.json listing its stages."""
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
        return _read_cascade(resolved[0], str(paths[0]))
    return CascadeDirs([StageDir(path) for path in resolved], None, ", ".join(str(p) for p in paths))


def _read_cascade(root: Path, source: str) -> CascadeDirs:
    file = root / "cascade.json"
    spec = _read_json(file, "cascade.json")
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        raise ModelError(file, 'cascade.json must hold {"stages": ["stage_I", "stage_II", ...]} '
                               "(stage directories relative to it, in cascade order)")
    dirs = [(root / s).resolve() for s in stages]  # symlinks followed: where the files really are
    for s, d in zip(stages, dirs):
        if not d.is_relative_to(root):
            raise ModelError(file, f"stage {s!r} resolves to {d}, outside the cascade's folder {root}: stages "
                                   "are directories under it (a symlink out of it counts as outside); move or "
                                   "copy the stage into the folder, or load the stage directories directly")
        if not d.is_dir():
            raise ModelError(d, "stage directory listed in cascade.json does not exist")
    # A model's own generation defaults, by stage directory: {"defaults": {"stage_II": {"steps": 20, ...}}}.
    defaults = spec.get("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) - set(stages):
        raise ModelError(file, f'cascade.json "defaults" must map stage directories ({", ".join(stages)}) to '
                               '{"steps": ..., "guidance": ..., "noise_level": ...}')
    return CascadeDirs([StageDir(d, defaults.get(s)) for d, s in zip(dirs, stages)], spec.get("notice"), source,
                       read_presets(spec.get("presets", {}), stages, file))


def read_presets(presets, stages: list[str], where) -> dict[str, Preset]:
    """cascade.json's (or an export manifest's) "presets", by stage directory name; ModelError on a bad one."""
    shape = ('"presets" must map names to {"stages": {STAGE_DIR: {"steps": ..., ...}}, "certified": {...}} '
             f"with stage directories among {', '.join(stages)}")
    if not isinstance(presets, dict):
        raise ModelError(where, shape)
    read = {}
    for name, preset in presets.items():
        if (not isinstance(preset, dict) or set(preset) - {"stages", "certified"}
                or not isinstance(preset.get("stages", {}), dict) or set(preset.get("stages", {})) - set(stages)):
            raise ModelError(where, f"preset {name!r}: {shape}")
        read[name] = Preset([preset.get("stages", {}).get(s) for s in stages], dict(preset.get("certified", {})))
    return read


def is_x4_upscaler(stage_dir: Path) -> bool:
    """Whether a stage directory holds Stability's x4 upscaler: a latent stage, the only kind with a vae/."""
    return (stage_dir / "vae").is_dir()


def stage_name(index: int) -> str:
    return f"stage_{'I' * (index + 1)}" if index < 3 else f"stage_{index + 1}"


# -- stages ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageSpec:
    """One stage as its configs describe it: what assemble.py needs, besides the backend's components."""

    name: str  # "stage_I", ...
    kind: str  # "base" | "super_resolution" | "latent_upscaler"
    directory: Path  # where its files are (a model directory, or its part of an exported one)
    scheduler_config: dict  # resolved (scheduler_config)
    noising_config: dict | None  # the image-noising (or x4 low-res) scheduler's; None for a base stage
    defaults: dict | None = None  # the model's own generation defaults (cascade.json), or None
    max_noise_level: int | None = None  # the x4 upscaler's bound on noise_level
    text_dim: int | None = None  # a first stage without a text encoder: the embeddings' width it takes


def read_stages(cascade: CascadeDirs) -> list[StageSpec]:
    """Every stage's configs, read and checked against each other (channels, text widths, variance) before any
    weights are read; ModelError names the stage directory and the problem."""
    dirs, first = cascade.dirs, cascade.stages[0]
    for stage_dir in dirs:
        check_configs(stage_dir)
        refuse_unsafe_shards(stage_dir)
    if is_x4_upscaler(first.path):  # alone: an upscaler of the images passed to generate(image=...)
        if len(dirs) > 1:
            raise ModelError(first.path, "an x4 upscaler stage is the last stage of a cascade; list it after the "
                                         "IF stages, e.g. engine.load(IF_I_DIR, IF_II_DIR, X4_DIR), or load it alone")
        return [_x4_stage(first.path, "stage_I", first.defaults)]
    first_config = model_config(dirs[0] / "unet", "UNet2DConditionModel", "U-Net config")
    upscales = first_config["in_channels"] == 2 * IMAGE_CHANNELS  # an IF super-resolution stage first (alone)
    with_text = all((dirs[0] / sub).is_dir() for sub in ("tokenizer", "text_encoder"))
    if not with_text and not upscales:
        missing = next(sub for sub in ("tokenizer", "text_encoder") if not (dirs[0] / sub).is_dir())
        raise ModelError(dirs[0], f"the first stage needs {missing}/ (a base stage as IF-I ships it)")
    # Without a text encoder (IF-II as diffusers loads it with text_encoder=None) the U-Net's width decides.
    text_dim = text_config(dirs[0] / "text_encoder").d_model if with_text else text_width(first_config)
    specs = []
    for index, stage in enumerate(cascade.stages):
        name = stage_name(index)
        if is_x4_upscaler(stage.path):
            specs.append(_x4_stage(stage.path, name, stage.defaults))
        else:
            specs.append(_if_stage(stage.path, index, name, text_dim, stage.defaults))
    if not with_text:
        specs[0] = replace(specs[0], text_dim=text_dim)  # no text encoder: prompt_embeds only
    return specs


def downsampling(block_out_channels) -> int:
    """How much a diffusers U-Net (or VAE) scales the sides between its first and last block: each block but
    the last halves (or, decoding, doubles) them."""
    return 2 ** (len(block_out_channels) - 1)


def unet_text_width(stage_dir: Path) -> int:
    """The width of the text embeddings a stage directory's U-Net takes."""
    return text_width(model_config(stage_dir / "unet", "UNet2DConditionModel", "U-Net config"))


def text_width(unet_config: dict) -> int:
    """The width of the text embeddings a resolved U-Net config takes: encoder_hid_dim where the U-Net
    projects them (IF's text_proj), else cross_attention_dim."""
    if unet_config.get("encoder_hid_dim_type") is not None:
        return unet_config["encoder_hid_dim"]
    return unet_config["cross_attention_dim"]


def _if_stage(stage_dir: Path, index: int, name: str, text_dim: int, defaults) -> StageSpec:
    config = model_config(stage_dir / "unet", "UNet2DConditionModel", "U-Net config")  # diffusers' defaulting
    scheduler = scheduler_config(stage_dir / "scheduler")
    in_ch, out_ch = config["in_channels"], config["out_channels"]
    if index == 0 and in_ch not in (IMAGE_CHANNELS, 2 * IMAGE_CHANNELS):
        raise ModelError(stage_dir, f"the first stage must be a base stage with a {IMAGE_CHANNELS}-channel "
                                    f"U-Net input, or a super-resolution stage (of images given to it) with "
                                    f"{2 * IMAGE_CHANNELS}; this U-Net takes {in_ch} channels")
    if index > 0 and in_ch != 2 * IMAGE_CHANNELS:
        raise ModelError(stage_dir, f"stages after the first must be super-resolution stages with a "
                                    f"{2 * IMAGE_CHANNELS}-channel U-Net input (x_t + upsampled image); "
                                    f"this U-Net takes {in_ch}" + ("; a base stage comes first in a cascade"
                                                                   if in_ch == IMAGE_CHANNELS else ""))
    if out_ch not in (IMAGE_CHANNELS, 2 * IMAGE_CHANNELS):
        raise ModelError(stage_dir, f"U-Net out_channels={out_ch}; expected {IMAGE_CHANNELS} (eps) or "
                                    f"{2 * IMAGE_CHANNELS} (eps + learned variance)")
    if scheduler.get("variance_type") in ("learned", "learned_range") and out_ch != 2 * IMAGE_CHANNELS:
        raise ModelError(stage_dir, f"the scheduler wants a learned variance but the U-Net has only "
                                    f"{out_ch} output channels")
    if text_width(config) != text_dim:
        raise ModelError(stage_dir, f"the U-Net expects text embeddings of width {text_width(config)} but the "
                                    f"text encoder produces {text_dim}: these stages do not belong to one cascade")
    noising = None
    upscales = in_ch == 2 * IMAGE_CHANNELS
    if upscales:
        if not (stage_dir / "image_noising_scheduler").is_dir():
            raise ModelError(stage_dir, "missing image_noising_scheduler/ (the image-noising scheduler of a "
                                        "super-resolution stage)")
        noising = scheduler_config(stage_dir / "image_noising_scheduler",
                                   "image-noising scheduler config of a super-resolution stage")
    return StageSpec(name, "super_resolution" if upscales else "base", stage_dir, scheduler, noising, defaults)


def _x4_stage(stage_dir: Path, name: str, defaults) -> StageSpec:
    config = model_config(stage_dir / "unet", "UNet2DConditionModel", "U-Net config")
    vae = model_config(stage_dir / "vae", "AutoencoderKL", "VAE config")
    scheduler = scheduler_config(stage_dir / "scheduler", default_class="DDIMScheduler")
    if not (stage_dir / "low_res_scheduler").is_dir():
        raise ModelError(stage_dir, "missing low_res_scheduler/ (the low-res noising scheduler config of the "
                                    "x4 upscaler)")
    low_res = scheduler_config(stage_dir / "low_res_scheduler", "low-res noising scheduler config")
    index = stage_dir / "model_index.json"
    pipeline_config = _read_json(index, "pipeline config") if index.is_file() else {}
    latent = vae["latent_channels"]
    if config["in_channels"] != latent + IMAGE_CHANNELS:
        raise ModelError(stage_dir, f"the x4 U-Net takes {config['in_channels']} channels; expected "
                                    f"{latent + IMAGE_CHANNELS} ({latent} latent + {IMAGE_CHANNELS} image)")
    if config["out_channels"] != latent:
        raise ModelError(stage_dir, f"the x4 U-Net predicts {config['out_channels']} channels; expected the "
                                    f"VAE's {latent} latent channels")
    if config.get("num_class_embeds") is None and config.get("class_embed_type") is None:
        raise ModelError(stage_dir, "the x4 U-Net has no class embedding for the noise level (num_class_embeds)")
    clip_dim = text_config(stage_dir / "text_encoder").hidden_size
    if text_width(config) != clip_dim:
        raise ModelError(stage_dir, f"the x4 U-Net expects text embeddings of width {text_width(config)} "
                                    f"but its text encoder produces {clip_dim}")
    return StageSpec(name, "latent_upscaler", stage_dir, scheduler, low_res, defaults,
                     max_noise_level=int(pipeline_config.get("max_noise_level", X4_MAX_NOISE_LEVEL)))


# -- hub ids --------------------------------------------------------------------------------------------------

def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name))


def hub_cache() -> Path:
    """The cache huggingface_hub reads, from the environment as it is now (HF_HUB_CACHE, HF_HOME, default)."""
    from huggingface_hub import constants

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(os.path.expandvars(cache)).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id` at `revision` (default: the cached main), never downloading."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelError(repo_id, f"not a local directory, and not in the local Hugging Face cache{at} "
                                  f"({cache}); the engine never downloads. On a machine with network run "
                                  f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}` "
                                  "(accept the model's license on huggingface.co first if it is gated) and copy "
                                  "the cache here, or set HF_HUB_CACHE to a cache that holds it") from exc


# -- configs --------------------------------------------------------------------------------------------------

def model_config(folder: Path, cls_name: str, what: str) -> dict[str, Any]:
    """A diffusers model's config as diffusers resolves it: `cls.from_config` on the meta device (no weights,
    no memory), then the registered config, which holds every default and fallback (for example
    encoder_hid_dim_type = "text_proj" where a diffusers 0.16 config sets only encoder_hid_dim)."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    raw = _load_config(cls, folder, what)
    try:
        with torch.device("meta"):
            model = cls.from_config(raw)
    except Exception as exc:  # diffusers raises many types for a config it cannot build
        raise ModelError(folder, f"the {what} does not describe a {cls_name} diffusers can build: {exc}") from exc
    return dict(model.config)


def scheduler_config(folder: Path, what: str = "scheduler config", default_class: str = "DDPMScheduler") -> dict[str, Any]:
    """A scheduler config with diffusers' defaults for its class filled in (keys added after the config was
    written included); the class must be one the engine's samplers implement."""
    import diffusers

    raw = _read_json(folder / "scheduler_config.json", what)
    name = raw.get("_class_name", default_class)
    if name not in SCHEDULER_CLASSES:
        raise ModelError(folder, f"scheduler {name} is not supported; supported: {', '.join(SCHEDULER_CLASSES)}")
    # `_use_default_values` lists the keys diffusers filled in: another scheduler class built from this config
    # takes its own defaults for them (diffusers' from_config rule), so it stays (engine/samplers.py reads it).
    resolved = dict(getattr(diffusers, name).from_config(raw).config)
    return {**resolved, "_class_name": name}


def text_config(folder: Path):
    """A text encoder's transformers config (T5Config, CLIPTextConfig), defaults applied."""
    from transformers import AutoConfig

    _read_json(folder / "config.json", "text encoder config")  # names a missing or corrupt file as ours do
    check_configs(folder)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise ModelError(folder, f"cannot read the text encoder config: {exc}") from exc


def _load_config(cls, folder: Path, what: str) -> dict[str, Any]:
    _read_json(folder / "config.json", what)
    return dict(cls.load_config(folder))


def _read_json(file: Path, what: str) -> dict:
    """A JSON config as an object, checked by check_config (no code, bounded sizes) before anyone builds from it."""
    if not file.is_file():
        raise ModelError(file.parent, f"missing {file.name} ({what})")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelError(file, f"{what} is {file.stat().st_size} bytes; a config is at most {MAX_CONFIG_BYTES}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(file, f"corrupt {what}: {exc}") from exc
    except RecursionError:  # the parser's own recursion: nested far past MAX_CONFIG_DEPTH
        raise ModelError(file, f"corrupt {what}: nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise ModelError(file, f"corrupt {what}: expected a JSON object")
    check_config(data, file)
    return data


def check_configs(folder: Path) -> None:
    """check_config on every config (CONFIG_FILES) in `folder` and its subfolders (a stage's components), so
    that no loader of transformers or diffusers sees one that names code or an unbounded size."""
    if not folder.is_dir():
        return
    for sub in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        for file in (sub / name for name in CONFIG_FILES):
            if not file.is_file():
                continue
            if file.stat().st_size > MAX_CONFIG_BYTES:
                raise ModelError(file, f"{file.stat().st_size} bytes; a config is at most {MAX_CONFIG_BYTES}")
            try:
                data = json.loads(file.read_bytes())
            except (OSError, ValueError):  # corrupt: no library builds anything from it; its reader names it
                continue
            except RecursionError:
                raise ModelError(file, f"corrupt config: nested deeper than {MAX_CONFIG_DEPTH} levels") from None
            if isinstance(data, dict):
                check_config(data, file)


def check_config(data: dict, file: Path) -> None:
    """ModelError, naming the file and field, for a config that names code in the model folder (auto_map, a
    custom pipeline, a class transformers or diffusers do not have), nests past MAX_CONFIG_DEPTH, or sizes a
    model past CONFIG_BOUNDS. Run on the raw JSON, before any library reads it or any module is built."""
    _check_depth(data, file)
    for key in REMOTE_CODE_KEYS:
        if key in data:
            raise ModelError(file, f'"{key}" names Python code in the model folder; this engine never runs code '
                                   f"from a model folder (trust_remote_code is always off): use a model whose "
                                   f"classes transformers and diffusers ship, or delete \"{key}\" if the "
                                   "built-in class is meant")
    for key in TRANSFORMERS_CLASS_KEYS:
        for name in _as_names(data.get(key)):
            _check_class("transformers", name, file, key)
    if file.name == "model_index.json" and "_class_name" in data:  # the pipeline's class: diffusers' own
        # (a component's config.json names its class too, but the engine builds fixed classes for components)
        _check_class("diffusers", data["_class_name"], file, "_class_name")
    if file.name == "model_index.json":  # components as [library, class]: diffusers resolves a library that is
        # not transformers or diffusers as one of diffusers' pipeline packages ("deepfloyd_if"), else as a module
        # in the folder: only the first kinds are let through
        for key, value in data.items():
            if isinstance(value, list) and value and value[0] is not None:
                library = value[0] if len(value) == 2 and isinstance(value[0], str) else None
                if library not in ("diffusers", "transformers"):
                    library = f"diffusers.pipelines.{library}" if library and library.isidentifier() else None
                if library is None or not _importable(library):
                    raise ModelError(file, f'"{key}": {value!r} names a library that is not transformers, '
                                           "diffusers or one of diffusers' pipelines (code in the model folder); "
                                           "this engine never runs code from a model folder")
                _check_class(library, value[1], file, key)
    for key, bound in CONFIG_BOUNDS.items():
        value = data.get(key)
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > MAX_CONFIG_LIST:
            raise ModelError(file, f'"{key}" lists {len(value)} values; published IF models have at most 5 '
                                   f"(this engine takes at most {MAX_CONFIG_LIST})")
        for v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v <= bound:
                raise ModelError(file, f'"{key}" is {value!r}; this engine builds models up to {key}={bound} '
                                       "(about 4x the largest published IF model): a config past it is refused "
                                       "before any module is built")


def _check_depth(data, file: Path) -> None:
    """Iteratively, so that a deep config is a ModelError, not a RecursionError in whoever walks it next."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise ModelError(file, f"corrupt config: nested deeper than {MAX_CONFIG_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _as_names(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@functools.cache
def _shipped(library: str) -> frozenset[str]:
    """The names `library` exports; dir() of transformers' and diffusers' lazy modules imports none of them."""
    import importlib

    return frozenset(dir(importlib.import_module(library)))


def _check_class(library: str, name, file: Path, key: str) -> None:
    """`name` must be a class `library` itself ships (a fast tokenizer's "...Fast" name included)."""
    if not isinstance(name, str) or not name.isidentifier() or name not in _shipped(library):
        raise ModelError(file, f'"{key}": {name!r} is not a {library} class; this engine loads only the classes '
                               f"{library} ships, never code from the model folder")


# -- weight files ---------------------------------------------------------------------------------------------

def variant_pattern(variant: str) -> re.Pattern:
    """Weight files of a variant, as transformers and diffusers name them (for "fp16"):
    model.fp16.safetensors, model.fp16-00001-of-00002.safetensors, model.safetensors.index.fp16.json,
    diffusion_pytorch_model.fp16.safetensors (and its shards and index alike)."""
    v = re.escape(variant)
    return re.compile(rf"\.{v}(-\d+-of-\d+)?\.safetensors$|\.safetensors\.index\.{v}\.json$")


# Full-precision files: no variant between the stem and the suffix (model.safetensors, model-00001-of-00002.
# safetensors, model.safetensors.index.json); "model.fp16.safetensors" or "model.ema.safetensors" are variants.
FULL_PATTERN = re.compile(r"^[^.]+(-\d+-of-\d+)?\.safetensors$|^[^.]+\.safetensors\.index\.json$")


def refuse_unsafe_shards(stage_dir: Path) -> None:
    """ModelError for a safetensors index (any component's, any variant's) whose weight_map names a shard that is
    not a .safetensors file beside it: diffusers and transformers open what the index names, and would
    torch.load a pickle shard (`.bin`) behind a safetensors index's name, or follow a path out of the folder."""
    indexes = sorted(stage_dir.glob("*/*.safetensors.index*.json")) + sorted(stage_dir.glob("*.safetensors.index*.json"))
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelError(index, f"corrupt weights index: {exc}") from exc
        if not isinstance(weight_map, dict):
            raise ModelError(index, "corrupt weights index: no weight_map object")
        unsafe = sorted({shard for shard in weight_map.values()
                         if not isinstance(shard, str) or not shard.endswith(".safetensors")
                         or Path(shard).name != shard or shard in (".", "..")})
        if unsafe:
            raise ModelError(index, f"the index names shard(s) that are not .safetensors files beside it "
                                    f"({', '.join(map(str, unsafe[:3]))}); this engine reads .safetensors only, never "
                                    "pickle: convert the weights with save_pretrained(..., safe_serialization=True)")


def weights_variant(folder: Path, dtype: torch.dtype, loader: str, variant: str | None = None) -> str | None:
    """The variant to pass to from_pretrained: None for the full-precision files, else e.g. "fp16".

    With variant=None: a float16/bfloat16 load reads the fp16 files where the folder has them, a float32 load
    the full ones (fp16 files only where there are no others). An explicit variant must be present.
    Refuses a folder with pickle weights only, naming the conversion.
    """
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    fp16 = [n for n in names if variant_pattern("fp16").search(n)]
    chosen = [n for n in names if variant and variant_pattern(variant).search(n)]
    full = [n for n in names if FULL_PATTERN.search(n)]
    if not fp16 and not full and not chosen:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            module, cls = loader.rsplit(".", 1)
            raise ModelError(folder, f"only pickle weights ({', '.join(pickles)}); this engine reads "
                                     f".safetensors only, never pickle. Convert once, if you trust the source: "
                                     f"python -c \"from {module} import {cls} as M; "
                                     f"M.from_pretrained('{folder}').save_pretrained('{folder}', "
                                     f"safe_serialization=True)\"")
        raise ModelError(folder, "no .safetensors weight files")
    if variant is not None:
        if not chosen:
            raise ModelError(folder, f"no {variant!r} variant weight files (found: {', '.join(fp16 + full)}); "
                                     "load with variant=None to pick by dtype")
        log.info("%s: reading the %s weight files (variant=%r)", folder, variant, variant)
        return variant
    if fp16 and (dtype != torch.float32 or not full):
        why = f"a {str(dtype).removeprefix('torch.')} load" if full else "the only safetensors weights here"
        log.info("%s: reading the fp16 weight files (%s)", folder, why)
        return "fp16"
    log.info("%s: reading the full-precision weight files", folder)
    return None


# -- tokenizers -----------------------------------------------------------------------------------------------

def load_tokenizer(stage_dir: Path):
    """The tokenizer of a stage as AutoTokenizer reads it: tokenizer.json where there is one, else the class its
    tokenizer_config.json names (T5Tokenizer from spiece.model for DeepFloyd, as diffusers' IFPipeline loads)."""
    from transformers import AutoTokenizer

    folder = stage_dir / "tokenizer"
    check_configs(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad tokenizer folder
        raise ModelError(folder, f"cannot load the tokenizer: {exc}") from exc
