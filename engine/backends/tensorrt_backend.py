"""The TensorRT backend: the engines of a directory built by export/tensorrt.py, run on a CUDA GPU.

Everything around the engines (prompt handling, samplers, guidance, noise, seeds) is the torch code every
backend shares; the text encoders, U-Nets and VAE decoder run as engines behind the calls of exported.py.
Tensors are bound by pointer (torch CUDA tensors in, a preallocated torch tensor out: no copies) and each
engine runs with execute_async_v3 on torch's current stream, or where that is the default stream on one of its
own ordered with it by stream waits (streams.py), so it orders with the sampler's torch ops without a host
synchronisation. TensorRT for RTX captures each engine's launches as a CUDA graph itself (its runtime
config's WHOLE_GRAPH_CAPTURE) and keeps the kernels it compiles at first run in a runtime cache, saved beside
the engines in .runtime-cache/ (hidden files are outside the manifest's hashes) where the directory is writable.

Checked before anything runs, each with an error that names the way out: the manifest's hashes (a flipped byte
or a missing file), the TensorRT flavour and version that built the engines, a CUDA GPU, and its compute
capability among the engines' targets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from engine.backends.exported import ExportedComponents, output_buffer, prepare_inputs
from engine.backends.streams import RunStream
from engine.backends.tensorrt_api import FLAVOURS, INSTALL, require_tensorrt
from engine.errors import EngineError, ModelError

log = logging.getLogger(__name__)

FALLBACK = "load the model with backend='torch' or backend='onnxruntime' instead"
RUNTIME_CACHE = ".runtime-cache"


def gpu_target(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


class TrtComponent:
    """One engine; call(**named torch tensors) -> torch tensor of its first output (`run`: every output, in the
    contract's order), ordered with torch's current stream."""

    def __init__(self, api, runtime, logger, path: Path, name: str, description: dict, device: torch.device,
                 cache_file: Path):
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ModelError(path, f"TensorRT cannot load this engine: {'; '.join(logger.errors) or 'no reason given'}; "
                                   f"rebuild it with `python -m engine export MODEL --format tensorrt`, or {FALLBACK}")
        self.name = name
        self.engine = engine
        self.cache_file = cache_file
        cached = cache_file.read_bytes() if cache_file.is_file() else None
        self.context, self.runtime_cache = api.execution_context(engine, cached)
        self.inputs = description["inputs"]
        self.outputs = description["outputs"]
        self.max_rows = description["profile"][next(iter(self.inputs))]["max"][0]
        self.device = device
        self.stream = RunStream(device, fix=False)
        self._cache_saved = False

    def __call__(self, **tensors: torch.Tensor) -> torch.Tensor:
        return self.run(**tensors)[0]

    def run(self, **tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, sizes = prepare_inputs(self.inputs, tensors, self.device)  # alive until the stream runs them
        if sizes["batch"] > self.max_rows:
            raise EngineError(f"{self.name}: {sizes['batch']} rows in one call, and its engine was built for at most "
                              f"{self.max_rows}; rebuild with a larger --max-batch or send fewer images per call")
        for name, t in inputs.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = tuple(output_buffer(spec, sizes, self.device) for spec in self.outputs.values())
        for name, out in zip(self.outputs, outputs):
            self.context.set_tensor_address(name, out.data_ptr())
        with self.stream.ordered() as stream:  # torch's current stream, or ours ordered with it (streams.py)
            ran = self.context.execute_async_v3(stream)
        if not ran:
            raise EngineError(f"TensorRT failed to run {self.name} at shapes "
                              f"{ {n: tuple(t.shape) for n, t in inputs.items()} }")
        if not self._cache_saved:
            self._save_runtime_cache()
        return outputs

    def _save_runtime_cache(self) -> None:
        """After the first run: the kernels RTX compiled for this GPU, for the next process (best effort)."""
        self._cache_saved = True
        if self.runtime_cache is None:
            return
        try:
            # Owner-only whatever the umask: a group-writable file makes a cache entry untrusted (cache_dir.py).
            self.cache_file.parent.mkdir(mode=0o700, exist_ok=True)
            descriptor = os.open(self.cache_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(bytes(self.runtime_cache.serialize()))
        except OSError as exc:
            log.info("runtime cache of %s not saved (%s); the next process compiles its kernels again", self.name, exc)


class TrtComponents(ExportedComponents):
    """Components (backends/protocol.py) of a TensorRT engine directory, every file verified first."""

    kind = "tensorrt"
    backend = "tensorrt"

    @classmethod
    def for_load(cls, root: Path, device: torch.device | None) -> "TrtComponents":
        """engine.load's: the engines at `root` on `device` (None: the current CUDA device)."""
        return cls(root, device)

    def __init__(self, root: Path, device: str | torch.device | None = None):
        super().__init__(root)
        built = self.manifest["tensorrt"]
        try:
            self.api = require_tensorrt(built["flavour"])
        except EngineError as exc:
            raise EngineError(f"the engines at {self.root} were built by TensorRT {built['flavour']} "
                              f"{built['version']} (import {FLAVOURS[built['flavour']]}), which is not installed: "
                              f"{INSTALL}, or {FALLBACK}") from exc
        if self.api.version != built["version"]:
            raise EngineError(f"the engines at {self.root} were built by TensorRT {built['flavour']} {built['version']} "
                              f"and this machine has {self.api.version}; engines run only on the version that built "
                              "them: rebuild with `python -m engine export MODEL --format tensorrt`, or install "
                              f"version {built['version']}")
        if not torch.cuda.is_available():
            raise EngineError(f"TensorRT engines run on an NVIDIA GPU, and PyTorch sees none here; {FALLBACK} "
                              f"(the engines at {self.root} are built and kept for a machine that has one)")
        self.device = torch.device(device if device is not None else "cuda")
        target = gpu_target(self.device)
        if target not in built["targets"]:
            offered = self.api.offered_targets()
            rebuild = target if target in offered else "current"
            raise EngineError(f"this GPU ({torch.cuda.get_device_name(self.device)}) is {target}, and the engines at "
                              f"{self.root} were built for {', '.join(built['targets'])}: rebuild them for it with "
                              f"`python -m engine export MODEL --format tensorrt --targets {rebuild}`, or {FALLBACK}")
        self.logger = self.api.logger()
        self.runtime = self.api.module.Runtime(self.logger)

    def component(self, name: str) -> TrtComponent:
        description = self.manifest["components"][name]
        with torch.cuda.device(self.device):
            return TrtComponent(self.api, self.runtime, self.logger, self.root / description["file"], name,
                                description, self.device, self.root / RUNTIME_CACHE / f"{name.replace('/', '.')}.bin")
