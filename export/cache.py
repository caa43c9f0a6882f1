"""The export cache: `engine.load(MODEL, backend="onnxruntime")` exports once and reuses the result, and
`backend="tensorrt"` builds engines once from that ONNX export and reuses them.

Entries are keyed by content, not by file names: the SHA-256 of every file of the source model (weights,
configs, tokenizer), the export options, and the versions of torch, onnx, onnxruntime and the engine. Moving
or renaming a model keeps its entry; changing one weight byte or upgrading torch makes a new one. Entries are
written atomically (export_onnx builds in a temporary directory and renames), and every use verifies the
entry's manifest first: a corrupt or partial entry is reported and rebuilt, never run.

TensorRT entries are keyed by the ONNX export they are built from (its manifest's SHA-256, which holds every
graph's), the build options (targets, images per call) and TensorRT's flavour and version.

Location: engine/cache_dir.py ($CASCADE_ENGINE_CACHE, else $XDG_CACHE_HOME/cascade-engine, else
~/.cache/cascade-engine), which also says what is trusted: onnx/ and tensorrt/ are owner-only and refused if a
symlink, another user's or writable by others. An entry is used only if it and everything under it are ours and
written by no one else, and its .seal (written before the entry is renamed into place) holds the cache's HMAC
over the entry's name and its manifest, which holds every file's SHA-256; else it is reported, set aside and
rebuilt. A manifest copied in with recomputed hashes has no valid seal without the cache's secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from engine.cache_dir import (CACHE_ENV, cache_dir, cache_root, owner_only, seal, sealed,  # noqa: F401 (CACHE_ENV:
                              set_aside, untrusted_tree)  # the cache's public name here too)
from engine.errors import ModelError
from engine.exported import manifest as manifest_io
from engine.model_dir import stage_dirs
from export.onnx import export_onnx, source_hash, versions
from engine.options import DEFAULT_MAX_BATCH
from export.tensorrt import build_engines, default_targets, require_tensorrt

log = logging.getLogger(__name__)

def cache_key(source_sha256: str, dtype: str, defaults: list | None = None, presets: dict | None = None) -> str:
    """defaults, presets: the model's own generation defaults and presets (cascade.json), which the export's
    manifest carries."""
    key = {"source": source_sha256, "options": {"format": "onnx", "dtype": dtype}, "versions": versions(),
           "defaults": defaults}
    if presets:  # absent from keys made before presets existed, so those entries stay valid
        key["presets"] = presets
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _onnx_entry(paths, dtype: str) -> tuple[Path, str, str]:
    """(the cache entry of the ONNX export of the cascade at `paths`, its source hash, the source's name)."""
    cascade = stage_dirs(paths)
    dirs, defaults = cascade.dirs, cascade.defaults
    source_sha256 = source_hash(dirs)  # reads every source file once; the export reuses it
    presets = {name: preset.to_json([d.name for d in dirs]) for name, preset in cascade.presets.items()}
    return cache_dir("onnx") / cache_key(source_sha256, dtype, defaults, presets)[:24], source_sha256, cascade.source


def existing_export(*paths, dtype: str = "float32") -> Path | None:
    """The verified cached ONNX export of the cascade at `paths` if there is one; nothing is exported."""
    entry, _, _ = _onnx_entry(paths, dtype)
    return entry if _usable(entry, "onnx", "ONNX export") else None


def cached_export(*paths, dtype: str = "float32", progress: bool = True) -> Path:
    """The directory of a verified ONNX export of the cascade at `paths`, exporting it first if needed."""
    entry, source_sha256, source = _onnx_entry(paths, dtype)
    if _usable(entry, "onnx", "ONNX export"):
        log.info("using the cached ONNX export of %s at %s", source, entry)
        return entry
    log.info("exporting %s to ONNX into the cache at %s (once)", source, entry)
    return export_onnx(*paths, out=entry, dtype=dtype, progress=progress, source_sha256=source_sha256,
                       finish=seal_entry)


def cached_engines(*paths, dtype: str = "float32", targets: tuple[str, ...] | None = None,
                   max_images: int = DEFAULT_MAX_BATCH, progress: bool = True) -> Path:
    """The directory of verified TensorRT engines for the cascade at `paths`, built first if needed (from the
    cached ONNX export, itself made first if needed)."""
    api = require_tensorrt()
    onnx_dir = cached_export(*paths, dtype=dtype, progress=progress)
    targets = api.check_targets(tuple(targets) if targets else default_targets(api))
    key = {"onnx": manifest_io.sha256_file(onnx_dir / manifest_io.MANIFEST), "targets": list(targets),
           "max_images": max_images, "tensorrt": [api.flavour, api.version]}
    entry = cache_dir("tensorrt") / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    if _usable(entry, "tensorrt", "TensorRT engines"):
        log.info("using the cached TensorRT engines of %s at %s", onnx_dir, entry)
        return entry
    log.info("building TensorRT engines from %s into the cache at %s (once)", onnx_dir, entry)
    return build_engines(onnx_dir, entry, targets=targets, max_images=max_images, progress=progress,
                         timing_cache=timing_cache_file(), finish=seal_entry)


def timing_cache_file() -> Path:
    """The data-center TensorRT builder's timing cache, shared by every build (TensorRT-RTX keeps none)."""
    return cache_dir("tensorrt") / "timing.cache"


SEAL = ".seal"  # in an entry: the cache's HMAC over the entry's name and manifest (hidden: not in the manifest)


def seal_entry(work: Path, entry: Path) -> None:
    """Seal a finished entry (built at `work`, to be renamed to `entry`): owner-only, then its seal written."""
    owner_only(work)
    (work / SEAL).write_text(seal(_sealed_part(work, entry.name)))
    owner_only(work / SEAL)


def _sealed_part(root: Path, name: str) -> bytes:
    return name.encode() + b"\0" + (root / manifest_io.MANIFEST).read_bytes()


def _usable(entry: Path, kind: str, what: str) -> bool:
    """Whether the cache entry exists and is trusted and verifies (module docstring); one that is not is
    reported and set aside (never followed, never run)."""
    if not os.path.lexists(entry):
        return False
    why = untrusted_tree(entry)
    if why is None:
        try:
            if not manifest_io.is_exported(entry):
                raise ModelError(entry, "no manifest.json (an interrupted export?)")
            if not sealed(_sealed_part(entry, entry.name), (entry / SEAL).read_text() if (entry / SEAL).is_file() else None):
                raise ModelError(entry, "not sealed by this cache (written by someone else, by another cache's "
                                        "secret, or by an engine before seals)")
            manifest_io.read_manifest(entry, kind=kind)
            return True
        except (ModelError, OSError) as exc:
            why = str(exc)
    log.warning("the cache entry of the %s is unusable (%s); rebuilding it", what, why)
    set_aside(entry)
    return False


# The exported backends' prepare hooks (engine/backends' BACKENDS): paths as engine.load takes them (stage
# directories, a cascade directory, a packaged name, hub ids), precision "float32" or "float16".

def prepare_onnx(paths, precision: str) -> Path:
    """The onnxruntime backend's: the cached ONNX export of the model at `paths`, exported first if needed."""
    return cached_export(*paths, dtype=precision)


def prepared_onnx(paths, precision: str) -> Path | None:
    """The onnxruntime backend's: that export if the cache holds it, else None."""
    return existing_export(*paths, dtype=precision)


def prepare_engines(paths, precision: str) -> Path:
    """The tensorrt backend's: cached engines for the model at `paths`, built first if needed."""
    return cached_engines(*paths, dtype=precision)
