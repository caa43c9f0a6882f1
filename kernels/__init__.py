"""Triton kernels for the cascade's hot spots, each with its reference implementation beside it.

Empty for now: the attention kernel is the next piece of work (issue 3). Kernels know nothing of the engine.
"""
