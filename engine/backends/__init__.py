"""Backends run one component ("call this U-Net with these named tensors"); the runtime knows nothing else.

Only the PyTorch backend exists so far; ONNX Runtime and TensorRT come with the exporters.
"""

BACKENDS = ("torch",)
