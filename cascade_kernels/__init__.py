"""Triton kernels for the cascade's hot spots, each with its reference implementation beside it.

Kernels know nothing of the engine.
"""

from cascade_kernels.attention import attention, reference_attention

__all__ = ["attention", "reference_attention"]
