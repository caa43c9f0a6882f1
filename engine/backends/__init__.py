"""Backends turn a stage's files into callable components (backends/protocol.py); the runtime knows nothing else.

    torch         diffusers/transformers modules in PyTorch, from model directories (torch_backend.py, with
                  our attention processors in attention.py)
    onnxruntime   graphs exported by export/onnx.py, run by ONNX Runtime (onnxruntime_backend.py)
    tensorrt      engines built by export/tensorrt.py, run by TensorRT on a CUDA GPU (tensorrt_backend.py,
                  either TensorRT flavour through tensorrt_api.py)

Both export backends share exported.py (an export's stages and the runtime's calls over its components).

A new backend is one file here and one entry in BACKENDS: the class of its Components, built as
cls(device, dtype, attention, variant) for model directories (onnxruntime and tensorrt are built from an export
instead).
"""

from __future__ import annotations

import importlib

import torch

# name -> "module:class" of its Components (imported when used: a backend's libraries may be optional).
BACKENDS = {
    "torch": "engine.backends.torch_backend:TorchComponents",
    "onnxruntime": "engine.backends.onnxruntime_backend:OrtComponents",
    "tensorrt": "engine.backends.tensorrt_backend:TrtComponents",
}
# dtype names, as requests (dtype="float16") and export manifests ("precision", "dtype") spell them.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
PRECISIONS = ("float32", "float16", "bfloat16")  # what a model may be loaded in


def components_class(backend: str):
    """The Components class registered for `backend`."""
    module, _, name = BACKENDS[backend].partition(":")
    return getattr(importlib.import_module(module), name)
