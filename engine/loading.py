"""engine.load(): check the options against the backend's entry (backends.BACKENDS), prepare its export where
it runs one, make its components and hand them to assemble.py. Nothing here names a backend but the default.

Accepted: stage directories as DeepFloyd publishes them, in cascade order (stage I: text_encoder/, tokenizer/,
unet/, scheduler/; stage II: unet/, scheduler/, image_noising_scheduler/), optionally followed by Stability's
x4 upscaler as stabilityai/stable-diffusion-x4-upscaler ships it (unet/, vae/, text_encoder/, tokenizer/,
scheduler/, low_res_scheduler/), each as a path or as a hub id found in the local Hugging Face cache
("DeepFloyd/IF-I-XL-v1.0"); a directory whose cascade.json lists its stages (`{"stages": ["stage_I",
"stage_II", "stage_III"]}`, relative paths); the name of a packaged model; or a directory exported by
`python -m engine export`. Directories are read by model_dir.py (configs as diffusers and transformers read
them, weights from .safetensors only; safety_checker/, feature_extractor/ and watermarker/ are not run) and
every config is checked before any weights are read; anything wrong raises ModelError naming the path.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import warnings
from pathlib import Path

import torch

from engine.assemble import build_pipeline
from engine.backends import BACKENDS, PRECISIONS, TORCH_DTYPES, runner_of
from engine.backends.attention import resolve_attention
from engine.backends.fast_unet import resolve_fast
from engine.errors import InvalidRequestError, ModelError
from engine.exported.manifest import export_kind, is_exported
from engine.model_dir import read_presets, read_stages, stage_dirs, unet_text_width
from engine.offload import OFFLOAD_MODES
from engine.options import closest_name
from engine.pipeline import Pipeline
from engine.plan import refuse_what_cannot_fit

log = logging.getLogger(__name__)

DTYPES = {name: TORCH_DTYPES[name] for name in PRECISIONS}


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


def load(*paths: str | Path, backend: str | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, attention: str | None = None, providers=None,
         revision: str | None = None, variant: str | None = None, torch_dtype: str | torch.dtype | None = None,
         fast: bool | None = None, text_encoder: bool = True, offload: str | None = None,
         text_encoder_device: str | torch.device | None = None, images_per_call: int = 1, **unknown) -> Pipeline:
    """A Pipeline for a cascade on disk (stage dirs in order, a dir with cascade.json), hub ids of snapshots in
    the local Hugging Face cache, a packaged model name, or a directory exported by `python -m engine export`.

    backend: "torch" (the default for model directories); "onnxruntime" (the default, and the only choice, for
    an ONNX export; for a model directory it exports into the cache on first use, see export/cache.py); or
    "tensorrt" (the default, and the only choice, for a TensorRT export; for a model directory it builds
    float16 engines into the cache on first use, from the cached ONNX export; engines run on a CUDA GPU).
    dtype (or diffusers' name, torch_dtype): float32 (CPU default), float16 (CUDA default) or bfloat16.
    variant: "fp16" reads the fp16 weight files of every component; None (default) picks them by dtype.
    revision: of hub ids, a branch, tag or commit in the local cache (default: main).
    attention (torch only): "triton" (our kernel; the default on CUDA when Triton is installed) or "sdpa".
    providers (onnxruntime only): ONNX Runtime execution providers; default CUDA when usable, else CPU.
    text_encoder (torch only): False loads the first stage without its text encoder (diffusers' text_encoder=None),
    to take prompt_embeds only; a stage directory without one is loaded so anyway.
    fast (torch only): the fast path (engine/executor.py, backends/fast_unet.py): static buffers, per-request
    text constants, compiled U-Nets cached across processes, CUDA graphs. None (default): on for CUDA, off for
    CPU (compiling costs about a minute per shape there, once), off with offload; `pipe.warmup()` pays that
    cost up front.
    offload (torch only): "model" or "sequential" (engine/offload.py): the models wait in host memory and each
    is on the device only while it runs, for GPUs the cascade does not fit (`python -m engine plan`).
    text_encoder_device (torch only): where T5 runs, e.g. "cpu" beside a GPU; its embeddings are sent over.
    images_per_call: the most images one U-Net call will run (a server's or batch job's max_batch). On CUDA the
    torch backend first plans the memory (engine/plan.py) and refuses, with the plan, what cannot fit.

    The steps: the options are checked against the backend's entry (backends.BACKENDS), an exported backend's
    export is prepared (made into the cache where `paths` is a model), its components made, the pipeline built.
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
    kind = export_kind(exported) if exported is not None else None
    name = backend or (runner_of(kind) if kind is not None else "torch")
    spec = BACKENDS[name]
    if kind is not None and spec.export_kind != kind:
        runner = runner_of(kind)
        what = BACKENDS[runner].export_name or kind
        raise InvalidRequestError(f"{exported} is {'an' if what[0] in 'AEIOU' else 'a'} {what} export; load it "
                                  f"with backend='{runner}' (or no backend), or load the original model directory "
                                  f"with backend='{name}'")
    options = _backend_options(name, spec, {"attention": attention, "variant": variant, "fast": fast,
                                            "providers": providers, "offload": offload,
                                            "text_encoder_device": text_encoder_device})
    if not text_encoder and spec.export_kind is not None:
        raise InvalidRequestError(f"text_encoder=False applies to the torch backend only; the {name} backend runs "
                                  "what the export holds")
    if spec.export_kind is None:
        pipe = _load_model(paths, spec, device, dtype, revision, dict(options), text_encoder, images_per_call)
    else:
        pipe = _load_export(paths, exported, name, spec, device, dtype, revision, dict(options))
    # What pipe.to(device, dtype) loads again: the same model and options, on another device or in another dtype.
    pipe.reload = functools.partial(load, *paths, backend=backend, revision=revision, text_encoder=text_encoder,
                                    **options)
    return pipe


def _backend_options(name: str, spec, given: dict) -> dict:
    """The backend-specific options given (not None), each refused where `spec` does not take it."""
    for option, value in given.items():
        if value is not None and option not in spec.options:
            owners = " and ".join(n for n, b in BACKENDS.items() if option in b.options)
            what = "runs what the export holds" if spec.export_kind else "does not take it"
            raise InvalidRequestError(f"{option}= applies to the {owners} backend only; the {name} backend {what}")
    return {option: value for option, value in given.items() if value is not None}


def _load_model(paths, spec, device, dtype, revision, options: dict, text_encoder: bool = True,
                images_per_call: int = 1) -> Pipeline:
    """A model-directory backend's pipeline (torch): every config checked before any weights are read."""
    device = resolve_device(device)
    if "attention" in spec.options:
        options["attention"] = resolve_attention(options.get("attention"), device)
    if options.get("offload") is not None:
        if options["offload"] not in OFFLOAD_MODES:
            raise InvalidRequestError(f"offload must be one of {', '.join(OFFLOAD_MODES)} (or None), got "
                                      f"{options['offload']!r}")
        if options.get("fast"):
            raise InvalidRequestError("offload moves weights between calls, which the fast path's compiled calls "
                                      "and captured graphs cannot follow: give fast=False (or leave it unset)")
        options["fast"] = False
    if "fast" in spec.options:
        options["fast"] = resolve_fast(options.get("fast"), device)
    if options.get("text_encoder_device") is not None:
        options["text_encoder_device"] = resolve_device(options["text_encoder_device"])
    dtype = resolve_dtype(dtype, device)
    cascade = stage_dirs(paths, revision)
    specs = read_stages(cascade)
    if not text_encoder and specs[0].text_dim is None:  # its T5 not loaded: prompt_embeds of its width only
        if specs[0].kind == "latent_upscaler":
            raise InvalidRequestError("text_encoder=False: the x4 upscaler encodes its prompts with its own CLIP")
        specs[0] = dataclasses.replace(specs[0], text_dim=unet_text_width(specs[0].directory))
    if device.type == "cuda":  # before any weights are read: what cannot fit is refused with the plan
        text_device = options.get("text_encoder_device")
        try:
            refuse_what_cannot_fit(specs, dtype, options.get("offload"),
                                   text_device is None or text_device == device, images_per_call, device,
                                   fast=bool(options.get("fast")))
        except InvalidRequestError:
            raise
        except Exception as exc:  # a model the plan cannot build on the meta device: loading goes on without it
            log.warning("no memory plan for this model (%s: %s); loading without checking that it fits",
                        type(exc).__name__, exc)
    components = spec.components_class()(device, dtype, **options)
    return build_pipeline(specs, components, source=cascade.source, notice=cascade.notice, presets=cascade.presets)


def _load_export(paths, exported: Path | None, name: str, spec, device, dtype, revision, options: dict) -> Pipeline:
    """An exported backend's pipeline over `exported`, or over the export its prepare hook makes of the model
    at `paths` (into the cache, once; TensorRT engines build on a machine without a GPU, which then gets the
    error that they need one, the engines cached)."""
    if device is not None:
        device = resolve_device(device)
        if device.type not in spec.devices:
            where = " or ".join({"cpu": "the CPU", "cuda": "a CUDA GPU"}[d] for d in spec.devices)
            raise InvalidRequestError(f"the {name} backend runs on {where}: use device='{spec.devices[0]}'"
                                      + (" (or none)" if len(spec.devices) == 1 else ""))
    elif "cpu" in spec.devices:
        device = resolve_device(None)  # the best here; a GPU-only backend checks for its GPU itself
    if exported is None:
        on = device if device is not None else torch.device(spec.devices[0])
        precision = _export_dtype(dtype or spec.default_precision, on, name)
        exported = spec.prepare_export(stage_dirs(paths, revision).dirs if revision else paths, precision)
    elif dtype is not None:
        raise _fixed_precision(exported)
    return _pipeline(spec.components_class().for_load(exported, device, **options))


def _exported_dir(paths) -> Path | None:
    """The directory if `paths` is one directory exported by `python -m engine export`, else None."""
    if len(paths) == 1 and isinstance(paths[0], (str, Path)):
        path = Path(paths[0]).expanduser().resolve()
        if is_exported(path):
            return path
        if path.is_dir() and not (path / "cascade.json").is_file() and any(path.glob("**/*.onnx")):
            raise ModelError(path, "holds ONNX graphs but no manifest.json: an interrupted export or a partial "
                                   "copy? Export again with `python -m engine export MODEL --out DIR`")
    return None


def _export_dtype(dtype, device: torch.device, backend: str) -> str:
    """The export precision ("float32" or "float16") for dtype= on `device`; bfloat16 is refused."""
    resolved = resolve_dtype(dtype, device)
    if resolved == torch.bfloat16:
        raise InvalidRequestError(f"the {backend} backend runs float32 or float16 exports, not bfloat16")
    return str(resolved).removeprefix("torch.")


def _fixed_precision(exported: Path) -> InvalidRequestError:
    return InvalidRequestError(f"{exported} was exported in a fixed precision (see its manifest.json); dtype= "
                               "cannot change it: export again with --dtype")


def load_exported(root: Path, providers=None, threads: int | None = None) -> Pipeline:
    """A Pipeline over an ONNX export, every file verified against its manifest first (the bench's own
    providers and threads)."""
    return _pipeline(BACKENDS["onnxruntime"].components_class()(root, providers, threads))


def _pipeline(components) -> Pipeline:
    """The Pipeline over an exported directory's components (ONNX Runtime or TensorRT)."""
    specs = components.stages()
    presets = read_presets(components.manifest.get("presets", {}), [spec.name for spec in specs], components.root)
    return build_pipeline(specs, components, source=str(components.root), notice=components.manifest.get("notice"),
                          presets=presets)
