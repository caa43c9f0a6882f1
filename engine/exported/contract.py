"""Each exported component's contract: input and output names, shapes with named dynamic axes, dtypes.

Written by the exporters (export/onnx.py, into manifest.json) and read by the backends that run exports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Contract:
    """One component's export contract; dtypes are numpy names.

    A dimension is an int, or the name of a dynamic axis ("batch"; "height", "width" for the x4 upscaler's
    latents), or in an output "name*k": k times that input axis (the VAE decoder's 4x larger image).
    """

    name: str  # "text_encoder", "stage_I/unet"
    file: str  # graph path relative to the exported directory
    inputs: dict  # name -> (shape, dtype), in the graph's argument order
    outputs: dict  # name -> (shape, dtype)
    precision: str
    value_ranges: dict  # integer input name -> (low, high) for example inputs
    example_sizes: dict = field(default_factory=dict)  # dynamic axis other than batch -> its example size

    def dynamic_axes(self) -> dict:
        return {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
                for name, (shape, _) in {**self.inputs, **self.outputs}.items()}

    def example_inputs(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        tensors = []
        for name, (shape, dtype) in self.inputs.items():
            size = [resolve_dim(d, {"batch": batch, **self.example_sizes}) for d in shape]
            if name in self.value_ranges:
                low, high = self.value_ranges[name]
                tensors.append(torch.randint(low, high, size, generator=generator))
            else:
                tensors.append(torch.randn(size, generator=generator).to(getattr(torch, dtype)))
        return tuple(tensors)

    def describe(self) -> dict:
        described = {"file": self.file, "precision": self.precision,
                     "inputs": {n: {"shape": list(s), "dtype": d} for n, (s, d) in self.inputs.items()},
                     "outputs": {n: {"shape": list(s), "dtype": d} for n, (s, d) in self.outputs.items()}}
        if self.example_sizes:  # the sizes the cascade gives its dynamic axes (TensorRT's profiles use them)
            described["sizes"] = dict(self.example_sizes)
        return described


def resolve_dim(dim, sizes: dict) -> int:
    """A contract dimension's size, given the sizes of the named axes."""
    if isinstance(dim, int):
        return dim
    name, _, factor = dim.partition("*")
    return sizes[name] * int(factor or 1)
