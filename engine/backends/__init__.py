"""Backends run one component ("call this U-Net with these named tensors"); the runtime knows nothing else.

torch: diffusers/transformers modules in PyTorch (torch_backend.py, attention.py).
onnxruntime: graphs exported by export/onnx.py, run by ONNX Runtime (onnxruntime_backend.py).
"""

BACKENDS = ("torch", "onnxruntime")
