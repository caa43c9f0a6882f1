"""Build TensorRT engines from an ONNX export (export/onnx.py): one engine per component, with a manifest.

    python -m engine export MODEL... --format tensorrt --out DIR [--dtype float16] [--targets sm80 sm89 ...]

MODEL is a model (exported to ONNX first, through the export cache) or an ONNX export directory. The engine
directory has the ONNX export's layout, each model.onnx replaced by a model.engine:

    manifest.json               format cascade-engine-tensorrt: every file's SHA-256, TensorRT's flavour and
                                version, the targets, each component's contract, optimisation profile, build
                                time, size and fused attention layers, the ONNX export it was built from
    text_encoder/model.engine   ... and the configs, tokenizers and schedulers, copied from the ONNX export
    stage_I/unet/model.engine

Optimisation profiles come from the contracts: "batch" is the number of rows, 1 to twice `max_images` (under
guidance each image is two rows), best at 2 (one image under guidance); the x4 upscaler's "height" and "width"
are the size the cascade hands it. TensorRT for RTX builds ahead of time for the listed compute capabilities
on any machine, GPU or not; running an engine needs a GPU of one of those capabilities.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from engine.backends.tensorrt_api import CURRENT, TensorRT, require_tensorrt
from engine.cache_dir import owner_only, set_aside, untrusted
from engine.errors import EngineError
from engine.exported import manifest as manifest_io
from engine.options import DEFAULT_MAX_BATCH  # the service's step batch
from engine.version import __version__
from export.onnx import replace_directory

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".engine"
# Ampere, Ada and Blackwell workstation GPUs, where no GPU is here to ask (Hopper is not offered by TensorRT-RTX)
DEFAULT_TARGETS = ("sm80", "sm86", "sm89", "sm120")
# How TensorRT names its fused attention kernels ("_gemm_mha_v2_myl0_62"); not "attention", which the ONNX
# node names of every layer inside an attention block carry ("/unet/down_blocks.1/attentions.0/...").
ATTENTION_LAYER = re.compile(r"mha|flash", re.IGNORECASE)


def default_targets(api: TensorRT) -> tuple[str, ...]:
    """This machine's GPU when it has one, else the workstation capabilities the flavour offers."""
    if torch.cuda.is_available() or api.flavour != "rtx":
        return (CURRENT,)
    return tuple(t for t in DEFAULT_TARGETS if t in api.offered_targets())


def engine_file(onnx_file: str) -> str:
    return str(Path(onnx_file).with_suffix(ENGINE_SUFFIX).as_posix())


def profile(description: dict, max_images: int) -> dict:
    """{input: {"min", "opt", "max": shape}} over the contract's dynamic axes (see the module docstring)."""
    sizes = description.get("sizes", {})
    bounds = {"batch": (1, 2, 2 * max_images)} | {axis: (size,) * 3 for axis, size in sizes.items()}
    shapes = {}
    for name, spec in description["inputs"].items():
        missing = [d for d in spec["shape"] if isinstance(d, str) and d not in bounds]
        if missing:
            raise EngineError(f"the ONNX export does not record the size of {missing} of {name}; export the "
                              "model to ONNX again with this version of the engine")
        shapes[name] = {key: [d if isinstance(d, int) else bounds[d][i] for d in spec["shape"]]
                        for i, key in enumerate(("min", "opt", "max"))}
    return shapes


def attention_summary(messages: list[tuple[int, str]]) -> dict:
    """From the detailed build log: how many layers the engine has and which are fused attention kernels."""
    listing = next((m for _, m in messages if m.startswith("Layers:")), None)
    if listing is None:
        return {"layers": None, "fused_attention": None, "attention_layers": []}
    layers = re.findall(r"Name: ([^,]+), LayerType: ([^,]+),", listing)
    fused = [name for name, kind in layers if ATTENTION_LAYER.search(name.rpartition("/")[2]) and kind != "gemm"]
    return {"layers": len(layers), "fused_attention": len(fused), "attention_layers": fused}


def _timing_cache_bytes(timing_cache: Path | None) -> bytes | None:
    """The timing cache's bytes where it is a regular file of ours no one else can write (TensorRT deserialises
    it); one that is not is reported and set aside (engine/cache_dir.py)."""
    if timing_cache is None or not os.path.lexists(timing_cache):
        return None
    status = timing_cache.lstat()
    why = untrusted(status) or (None if stat.S_ISREG(status.st_mode) else "it is not a regular file")
    if why is not None:
        log.warning("the TensorRT timing cache %s is not read: %s; starting a new one", timing_cache, why)
        set_aside(timing_cache)
        return None
    return timing_cache.read_bytes()


def build_engine(api: TensorRT, onnx_path: Path, shapes: dict, targets: tuple[str, ...],
                 timing_cache: Path | None = None) -> tuple[bytes, dict]:
    """(serialized engine, build summary) for one ONNX graph. timing_cache: a file of tactic timings that the
    data-center flavour reads and updates (RTX has none)."""
    trt = api.module
    logger = api.logger()
    builder = trt.Builder(logger)
    network = api.network(builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the layer listing: fused attention
    api.set_targets(config, targets)
    optimisation = builder.create_optimization_profile()
    for name, shape in shapes.items():
        optimisation.set_shape(name, shape["min"], shape["opt"], shape["max"])
    config.add_optimization_profile(optimisation)
    known = _timing_cache_bytes(timing_cache)
    cache = api.attach_timing_cache(config, known)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {onnx_path}: {'; '.join(logger.errors) or 'no reason given'}")
    if cache is not None and timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        partial = timing_cache.with_name(f".{timing_cache.name}.{uuid.uuid4().hex[:8]}")
        partial.write_bytes(bytes(cache.serialize()))
        owner_only(partial)
        os.replace(partial, timing_cache)  # replaces a link, never writes through one
    data = bytes(serialized)
    return data, {"seconds": round(time.perf_counter() - start, 2), "bytes": len(data),
                  **attention_summary(logger.messages)}


def build_engines(onnx_dir: str | Path, out: str | Path, targets: tuple[str, ...] | None = None,
                  max_images: int = DEFAULT_MAX_BATCH, progress: bool = True, timing_cache: Path | None = None,
                  finish: Callable[[Path, Path], None] | None = None) -> Path:
    """Engines for every component of the ONNX export at `onnx_dir`, written to `out` (atomically: built beside
    it and renamed); returns `out`. `out` may be an earlier engine directory (replaced), nothing else non-empty.
    timing_cache: see build_engine (the export cache and the command line keep one in the cache directory).
    finish: called with (the finished directory, `out`) before the rename (the cache seals its entries there)."""
    from tqdm.auto import tqdm

    api = require_tensorrt()
    onnx_dir, out = Path(onnx_dir).expanduser().resolve(), Path(out).expanduser().resolve()
    source = manifest_io.read_manifest(onnx_dir, kind="onnx")
    if not isinstance(max_images, int) or max_images < 1:
        raise EngineError(f"max_images must be a positive integer, got {max_images!r}")
    targets = api.check_targets(tuple(targets) if targets else default_targets(api))
    if CURRENT in targets and not torch.cuda.is_available():
        raise EngineError("the target 'current' builds for this machine's GPU, and PyTorch sees none; name the "
                          f"compute capabilities instead (offered: {', '.join(api.offered_targets()[:-1])})")
    if out.exists() and any(out.iterdir()) and manifest_io.export_kind(out) != "tensorrt":
        raise EngineError(f"{out} exists and is not an earlier TensorRT export; choose an empty or new directory")
    built_for = [f"sm{''.join(map(str, torch.cuda.get_device_capability()))}"] if CURRENT in targets else list(targets)

    work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(onnx_dir, work, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data", manifest_io.MANIFEST,
                                                                  ".seal"))
        components = {}
        for name, description in tqdm(source["components"].items(), desc="build tensorrt", disable=not progress):
            shapes = profile(description, max_images)
            data, summary = build_engine(api, onnx_dir / description["file"], shapes, targets, timing_cache)
            file = engine_file(description["file"])
            (work / file).parent.mkdir(parents=True, exist_ok=True)
            (work / file).write_bytes(data)
            described = {k: v for k, v in description.items() if k != "check"}
            components[name] = described | {"file": file, "onnx_check": description["check"], "profile": shapes,
                                            "build": summary}
            log.info("built %s: %s", name, {k: v for k, v in summary.items() if k != "attention_layers"})
        manifest_io.write(work, {
            "precision": source["precision"],
            "source": source["source"] | {"onnx_manifest_sha256": manifest_io.sha256_file(onnx_dir / manifest_io.MANIFEST)},
            "notice": source.get("notice"),
            "versions": source["versions"] | {"engine": __version__, "tensorrt": api.version},
            "tensorrt": {"flavour": api.flavour, "version": api.version, "targets": built_for,
                         "max_images": max_images},
            "components": components, "stages": source["stages"], "presets": source.get("presets", {}),
        }, kind="tensorrt")
        if finish is not None:
            finish(work, out)
        replace_directory(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def describe(out: Path) -> str:
    """One line per engine for the command line's summary."""
    manifest = json.loads((out / manifest_io.MANIFEST).read_text())
    lines = []
    for name, component in manifest["components"].items():
        build = component["build"]
        fused = "" if build["fused_attention"] is None else f", {build['fused_attention']} fused attention layers"
        lines.append(f"{name}: {component['file']} ({component['precision']}, {build['bytes'] / 2**20:.1f} MiB, "
                     f"built in {build['seconds']:.1f}s{fused})")
    trt = manifest["tensorrt"]
    lines.append(f"TensorRT {trt['flavour']} {trt['version']}, targets {', '.join(trt['targets'])}, "
                 f"up to {trt['max_images']} images per call")
    return "\n".join(lines)
