"""Backends turn a stage's files into callable components (backends/protocol.py); the runtime knows nothing else.

    torch         diffusers/transformers modules in PyTorch, from model directories (torch_backend.py, with
                  our attention processors in attention.py and the fast path's U-Net in fast_unet.py)
    onnxruntime   graphs exported by export/onnx.py, run by ONNX Runtime (onnxruntime_backend.py)
    tensorrt      engines built by export/tensorrt.py, run by TensorRT on a CUDA GPU (tensorrt_backend.py,
                  either TensorRT flavour through tensorrt_api.py)

Both export backends share exported.py (an export's stages and the runtime's calls over its components).

Each backend is one `Backend` entry in BACKENDS, data that engine.load reads (loading.py: validate the options
against the entry, prepare an export where it runs one, make the components, build the pipeline):
- a model-directory backend's Components is built as cls(device, dtype, **options), its options resolved
  (attention, variant, fast, offload, text_encoder_device for torch);
- an exported backend's as cls.for_load(root, device, **options) over an export of its `export_kind`, which its
  `prepare` hook ("module:function", imported when used) makes into the cache from model directories first.
A new exported backend is a backend file here, an export file under export/ (and its prepare hook), and one
entry; tests/test_backend_protocol.py registers a fourth, fake, exported backend that way.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Backend:
    """One backend, as engine.load needs to know it."""

    components: str  # "module:Class" of its Components (imported when used: a backend's libraries may be optional)
    options: tuple[str, ...] = ()  # engine.load's options that it alone takes; every other backend refuses them
    export_kind: str | None = None  # the format of the exports it runs (their manifest's); None: model directories
    export_name: str = ""  # that format as messages name it ("ONNX")
    # "module:function"(paths, precision) -> the directory of an export of `export_kind` for the model at `paths`
    # (made into the cache first if needed); None for a model-directory backend.
    prepare: str | None = None
    # "module:function"(paths, precision) -> that directory if the cache holds it already, else None (nothing made)
    cached: str | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")  # the device types it runs on
    default_precision: str | None = None  # what `prepare` makes when no dtype is given (None: the device's)

    def components_class(self):
        return _resolve(self.components)

    def prepare_export(self, paths, precision: str):
        return _resolve(self.prepare)(paths, precision)

    def existing_export(self, paths, precision: str):
        """The cached export for the model at `paths` if there is one, else None; nothing is made."""
        return None if self.cached is None else _resolve(self.cached)(paths, precision)


def _resolve(target: str):
    """The object a "module:name" string names, its module imported now: how the engine reaches export/ (which
    imports the engine) without importing it at module level."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


BACKENDS = {
    "torch": Backend("engine.backends.torch_backend:TorchComponents",
                     options=("attention", "variant", "fast", "offload", "text_encoder_device")),
    "onnxruntime": Backend("engine.backends.onnxruntime_backend:OrtComponents", options=("providers",),
                           export_kind="onnx", export_name="ONNX", prepare="export.cache:prepare_onnx",
                           cached="export.cache:prepared_onnx"),
    "tensorrt": Backend("engine.backends.tensorrt_backend:TrtComponents", export_kind="tensorrt", export_name="TensorRT",
                        prepare="export.cache:prepare_engines", devices=("cuda",), default_precision="float16"),
}
# dtype names, as requests (dtype="float16") and export manifests ("precision", "dtype") spell them.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
PRECISIONS = ("float32", "float16", "bfloat16")  # what a model may be loaded in


def runner_of(kind: str) -> str:
    """The backend that runs exports of `kind` (a manifest's format)."""
    return next(name for name, backend in BACKENDS.items() if backend.export_kind == kind)
