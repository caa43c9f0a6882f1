"""engine.load(): resolve the options, pick the backend, and hand its components to assemble.py.

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

import inspect
import warnings
from pathlib import Path

import torch

from engine.assemble import build_pipeline
from engine.backends import BACKENDS, PRECISIONS, TORCH_DTYPES, components_class
from engine.backends.attention import resolve_attention
from engine.backends.fast_unet import resolve_fast
from engine.backends.onnxruntime_backend import OrtComponents
from engine.backends.tensorrt_backend import TrtComponents
from engine.backends.torch_backend import TorchComponents
from engine.errors import InvalidRequestError, ModelError
from engine.exported.manifest import export_kind, is_exported
from engine.model_dir import read_presets, read_stages, stage_dirs
from engine.options import closest_name
from engine.pipeline import Pipeline
from export.cache import cached_engines, cached_export

DTYPES = {name: TORCH_DTYPES[name] for name in PRECISIONS}
RUNNER = {"onnx": "onnxruntime", "tensorrt": "tensorrt"}  # export kind (its manifest's format) -> its backend


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
         fast: bool | None = None, **unknown) -> Pipeline:
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
    fast (torch only): the fast path (engine/executor.py, backends/fast_unet.py): static buffers, per-request text constants, compiled
    U-Nets cached across processes, CUDA graphs. None (default): on for CUDA, off for CPU (compiling costs
    about a minute per shape there, once); `pipe.warmup()` pays that cost up front.
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
    if kind is not None or backend in ("onnxruntime", "tensorrt"):
        runner = backend or RUNNER[kind]
        for option, value in (("attention", attention), ("variant", variant), ("fast", fast)):
            if value is not None:
                raise InvalidRequestError(f"{option}= applies to the torch backend only; the {runner} backend runs "
                                          "what the export holds")
        if kind is not None and runner != RUNNER[kind]:
            raise InvalidRequestError(f"{exported} is {'an ONNX' if kind == 'onnx' else 'a TensorRT'} export; load it "
                                      f"with backend='{RUNNER[kind]}' (or no backend), or load the original model "
                                      f"directory with backend='{runner}'")
        if runner == "tensorrt":
            if providers is not None:
                raise InvalidRequestError("providers= applies to the onnxruntime backend only")
            return _load_tensorrt(paths, exported, device, dtype, revision)
        return _load_onnxruntime(paths, exported, device, dtype, providers, revision)
    if providers is not None:
        raise InvalidRequestError("providers= applies to the onnxruntime backend only")
    device = resolve_device(device)
    attention = resolve_attention(attention, device)
    dtype = resolve_dtype(dtype, device)
    cascade = stage_dirs(paths, revision)
    specs = read_stages(cascade)  # every config checked before any weights are read
    fast = resolve_fast(fast, device)
    if backend in (None, "torch"):
        components = TorchComponents(device, dtype, attention, variant, fast=fast)
    elif fast:
        raise InvalidRequestError(f"fast=True applies to the torch backend only, not {backend!r}")
    else:
        components = components_class(backend)(device, dtype, attention, variant)
    return build_pipeline(specs, components, source=cascade.source, notice=cascade.notice, presets=cascade.presets)


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


def _load_onnxruntime(paths, exported: Path | None, device, dtype, providers, revision) -> Pipeline:
    device = resolve_device(device)
    if providers is None and device.type == "cpu":
        providers = ["CPUExecutionProvider"]
    if exported is None:
        exported = cached_export(*stage_dirs(paths, revision).dirs if revision else paths,
                                 dtype=_export_dtype(dtype, device, "onnxruntime"))
    elif dtype is not None:
        raise _fixed_precision(exported)
    return load_exported(exported, providers=providers)


def _load_tensorrt(paths, exported: Path | None, device, dtype, revision) -> Pipeline:
    """Engines of a TensorRT export, or built into the cache from the model at `paths` first (this works on a
    machine without a GPU, which then gets the error that engines need one, with the engines cached)."""
    if device is not None and resolve_device(device).type != "cuda":
        raise InvalidRequestError("the tensorrt backend runs on a CUDA GPU: use device='cuda' (or none)")
    if exported is None:
        exported = cached_engines(*stage_dirs(paths, revision).dirs if revision else paths,  # float16: a GPU's
                                  dtype=_export_dtype(dtype or "float16", torch.device("cuda"), "tensorrt"))
    elif dtype is not None:
        raise _fixed_precision(exported)
    return _pipeline(TrtComponents(exported, device))


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
    """A Pipeline over an ONNX export, every file verified against its manifest first."""
    return _pipeline(OrtComponents(root, providers, threads))


def _pipeline(components) -> Pipeline:
    """The Pipeline over an exported directory's components (ONNX Runtime or TensorRT)."""
    specs = components.stages()
    presets = read_presets(components.manifest.get("presets", {}), [spec.name for spec in specs], components.root)
    return build_pipeline(specs, components, source=str(components.root), notice=components.manifest.get("notice"),
                          presets=presets)
