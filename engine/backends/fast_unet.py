"""The torch backend's fast path: a TorchUNet that is static (backends/protocol.py), so the stage's executor
(engine/executor.py) calls it on buffers allocated once per shape and, on CUDA, captures its calls.

`FastUNet` is channels_last, its text-only work taken out of the steps (text_constants.py: `text_constants`
computes it once per request, or once per change of the scheduler's batch, and every call takes it as
`values`), and compiled (compiled.py), one graph per static shape. Nothing here knows about runs, samplers or
buffers: that is the executor's.
"""

from __future__ import annotations

import functools

import torch

from engine.backends.compiled import CompiledCall, signature
from engine.backends.text_constants import TextConstants
from engine.exported.manifest import source_hash


def resolve_fast(fast: bool | None, device: torch.device) -> bool:
    """None: on for CUDA; off for CPU, where compiling a shape takes about a minute on a small machine (once:
    the package is cached) and a one-off image is done sooner without it."""
    return device.type == "cuda" if fast is None else bool(fast)


class _Call(torch.nn.Module):
    """The U-Net call that gets compiled: the request's text constants (or None: computed) go in as inputs."""

    def __init__(self, model, constants: TextConstants):
        super().__init__()
        self.model, self.constants = model, constants

    def forward(self, sample, timestep, embeddings, class_labels, values):
        self.constants.use(values)
        return self.model(sample, timestep, encoder_hidden_states=embeddings, class_labels=class_labels,
                          return_dict=False)[0]


class FastUNet:
    """A TorchUNet on the fast path (module docstring); called like any U-Net (backends/protocol.py), plus
    `values`, the text constants for the call's rows (None: computed in the call)."""

    static = True  # compiled per shape: the executor calls it on static buffers (and captures it on CUDA)

    def __init__(self, unet, directory, compile: bool = True):
        model = unet.model.to(memory_format=torch.channels_last)
        self.model = model
        self.attention = unet.attention
        self.in_channels, self.out_channels = unet.in_channels, unet.out_channels
        self.sample_size, self.downsampling, self.dtype = unet.sample_size, unet.downsampling, unet.dtype
        self.device = model.device
        self.constants = TextConstants(model, unet.attention)
        self.directory = directory  # its weights and config: the compiled cache's key holds their hash
        self.compile = compile
        self._call = _Call(model, self.constants)
        self._compiled: dict[tuple, CompiledCall] = {}  # per shape; each says what making it cost (.seconds)

    def text_constants(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The text-only values for (rows, 77, D) prompt embeddings (text_constants.py), fresh tensors; None
        where this U-Net has no text-only work."""
        return self.constants.constants(embeddings) if self.constants.active else None

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None, values=None):
        sample = sample.contiguous(memory_format=torch.channels_last)  # no copy for the executor's buffers
        timestep = timestep.contiguous()  # (rows,): a single run's step expands one timestep
        args = (sample, timestep, encoder_hidden_states, class_labels, values)
        if not self.compile:
            return self._call(*args)
        key = signature(args)  # shapes, dtypes and strides of every argument, the text constants' too
        if key not in self._compiled:
            self._compiled[key] = CompiledCall(self._call, args, self.device, lambda: self.source)
        return self._compiled[key](*args)

    @functools.cached_property
    def source(self) -> str:
        """The hash of its directory's files, read once (not once per compiled shape)."""
        return source_hash([self.directory])
