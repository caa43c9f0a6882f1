"""Backends run one component ("call this U-Net with these named tensors"); the runtime knows nothing else.

torch: diffusers/transformers modules in PyTorch (torch_backend.py, attention.py).
onnxruntime: graphs exported by export/onnx.py, run by ONNX Runtime (onnxruntime_backend.py).
"""

import torch

BACKENDS = ("torch", "onnxruntime")
# dtype names, as requests (dtype="float16") and export manifests ("precision", "dtype") spell them.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
PRECISIONS = ("float32", "float16", "bfloat16")  # what a model may be loaded in
