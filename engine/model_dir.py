"""Model directories read as their owners read them.

- Hub ids ("DeepFloyd/IF-I-XL-v1.0") resolve to a snapshot of the local Hugging Face cache through
  huggingface_hub's own lookup, local files only: no network call is ever made, whatever HF_HUB_OFFLINE says.
- Configs go through the defaulting of the library that owns them (diffusers for U-Nets, VAEs and schedulers,
  transformers for text encoders), so that configs written by older versions (DeepFloyd's, by diffusers 0.16)
  get today's defaults and backward-compatibility fallbacks. No raw JSON key decides what a model is.
- Weight files are recognised as transformers and diffusers name them: single files and sharded checkpoints
  with their index, full precision and the fp16 variant; pickle files are never read.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# An organisation/name pair as the Hub spells repository ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Folders of a published snapshot that diffusers' IF pipelines can load but this engine does not run.
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "watermarker")


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
    from engine.samplers import SCHEDULER_CLASSES

    raw = _read_json(folder / "scheduler_config.json", what)
    name = raw.get("_class_name", default_class)
    if name not in SCHEDULER_CLASSES:
        raise ModelError(folder, f"scheduler {name} is not supported; supported: {', '.join(SCHEDULER_CLASSES)}")
    return resolve_scheduler_config(raw, name)


def resolve_scheduler_config(raw: dict[str, Any], name: str) -> dict[str, Any]:
    import diffusers

    # `_use_default_values` lists the keys diffusers filled in: another scheduler class built from this config
    # takes its own defaults for them (diffusers' from_config rule), so it stays (engine/samplers.py reads it).
    resolved = dict(getattr(diffusers, name).from_config(raw).config)
    return {**resolved, "_class_name": name}


def text_config(folder: Path):
    """A text encoder's transformers config (T5Config, CLIPTextConfig), defaults applied."""
    from transformers import AutoConfig

    _read_json(folder / "config.json", "text encoder config")  # names a missing or corrupt file as ours do
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise ModelError(folder, f"cannot read the text encoder config: {exc}") from exc


def _load_config(cls, folder: Path, what: str) -> dict[str, Any]:
    _read_json(folder / "config.json", what)
    return dict(cls.load_config(folder))


def _read_json(file: Path, what: str) -> dict:
    import json

    if not file.is_file():
        raise ModelError(file.parent, f"missing {file.name} ({what})")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(file, f"corrupt {what}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(file, f"corrupt {what}: expected a JSON object")
    return data


# -- weight files ---------------------------------------------------------------------------------------------

def variant_pattern(variant: str) -> re.Pattern:
    """Weight files of a variant, as transformers and diffusers name them (for "fp16"):
    model.fp16.safetensors, model.fp16-00001-of-00002.safetensors, model.safetensors.index.fp16.json,
    diffusion_pytorch_model.fp16.safetensors (and its shards and index alike)."""
    v = re.escape(variant)
    return re.compile(rf"\.{v}(-\d+-of-\d+)?\.safetensors$|\.safetensors\.index\.{v}\.json$")


FULL_PATTERN = re.compile(r"(-\d+-of-\d+)?\.safetensors$|\.safetensors\.index\.json$")


def weights_variant(folder: Path, dtype: torch.dtype, loader: str, variant: str | None = None) -> str | None:
    """The variant to pass to from_pretrained: None for the full-precision files, else e.g. "fp16".

    With variant=None: a float16/bfloat16 load reads the fp16 files where the folder has them, a float32 load
    the full ones (fp16 files only where there are no others). An explicit variant must be present.
    Refuses a folder with pickle weights only, naming the conversion.
    """
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    fp16 = [n for n in names if variant_pattern("fp16").search(n)]
    chosen = [n for n in names if variant and variant_pattern(variant).search(n)]
    full = [n for n in names if FULL_PATTERN.search(n) and n not in fp16 and not _is_other_variant(n)]
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


def _is_other_variant(name: str) -> bool:
    # model.ema.safetensors, model.safetensors.index.ema.json: a variant other than fp16 (never chosen by dtype)
    stem = name.split(".safetensors")[0]
    return "." in stem.split("-")[0] or bool(re.search(r"\.safetensors\.index\.[^.]+\.json$", name))


# -- tokenizers -----------------------------------------------------------------------------------------------

def load_tokenizer(stage_dir: Path):
    """The tokenizer of a stage as AutoTokenizer reads it: tokenizer.json where there is one, else the class its
    tokenizer_config.json names (T5Tokenizer from spiece.model for DeepFloyd, as diffusers' IFPipeline loads)."""
    from transformers import AutoTokenizer

    folder = stage_dir / "tokenizer"
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types for a bad tokenizer folder
        raise ModelError(folder, f"cannot load the tokenizer: {exc}") from exc
