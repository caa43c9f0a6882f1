"""The torch backend's fast path: a TorchUNet that is static (backends/protocol.py), so the stage's executor
(engine/executor.py) calls it on buffers allocated once per shape and, on CUDA, captures its calls.

`FastUNet` is channels_last, its text-only work taken out of the steps (text_constants.py: `text_constants`
computes it once per request, or once per change of the scheduler's batch, and every call takes it as
`values`), and compiled (compiled.py), one graph per static shape. Nothing here knows about runs, samplers or
buffers: that is the executor's.
"""

from __future__ import annotations

import functools
import os

import torch

from engine.backends.compiled import CompiledCall, signature
from engine.backends.text_constants import TextConstants
from engine.exported.manifest import source_hash


# "0": the fast path's U-Net calls run uncompiled (static buffers, text constants and, on CUDA, graphs stay): what
# a rehearsal of the GPU campaign on a CPU sets (bench/campaign.py), where a compiled shape costs a minute.
COMPILE_ENV = "CASCADE_FAST_COMPILE"


def compile_by_default() -> bool:
    return os.environ.get(COMPILE_ENV, "1") != "0"


def resolve_fast(fast: bool | None, device: torch.device) -> bool:
    """None: on for CUDA; off for CPU, where compiling a shape takes about a minute on a small machine (once:
    the package is cached) and a one-off image is done sooner without it."""
    return device.type == "cuda" if fast is None else bool(fast)


class _Call(torch.nn.Module):
    """A U-Net call that gets compiled: the request's text constants (or None: computed) go in as inputs.
    kind "unet": the plain call -> out; "full": -> (out, kept); "shallow": takes `kept` last -> out; `depth`
    is the caching depth of the last two."""

    def __init__(self, unet, constants: TextConstants, kind: str = "unet", depth: int = 0):
        super().__init__()
        self.model, self.unet, self.constants, self.kind, self.depth = unet.model, unet, constants, kind, depth

    def forward(self, sample, timestep, embeddings, class_labels, values, kept=None):
        self.constants.use(values)
        if self.kind == "full":
            return self.unet.full(sample, timestep, embeddings, class_labels, self.depth)
        if self.kind == "shallow":
            return self.unet.shallow(sample, timestep, embeddings, class_labels, kept, self.depth)
        return self.unet(sample, timestep, embeddings, class_labels)


class FastUNet:
    """A TorchUNet on the fast path (module docstring); called like any U-Net (backends/protocol.py), plus
    `values`, the text constants for the call's rows (None: computed in the call)."""

    static = True  # compiled per shape: the executor calls it on static buffers (and captures it on CUDA)

    def __init__(self, unet, directory, compile: bool | None = None, source: str | None = None):
        """directory: its weights' folder, whose files key the compiled cache; or `source`, that key itself
        (weights made in memory, not read from files). compile None: compile_by_default()."""
        model = unet.model.to(memory_format=torch.channels_last)
        self.model = model
        self.attention = unet.attention
        self.in_channels, self.out_channels = unet.in_channels, unet.out_channels
        self.sample_size, self.downsampling, self.dtype = unet.sample_size, unet.downsampling, unet.dtype
        self.device = model.device
        self.eager = unet  # its full and shallow calls (feature caching) and their kept shapes
        self.constants = TextConstants(model, unet.attention)
        self.directory = directory  # its weights and config: the compiled cache's key holds their hash
        if source is not None:
            self.source = source  # over the cached property
        self.compile = compile_by_default() if compile is None else compile
        self._calls = {("unet", 0): _Call(unet, self.constants)}  # per call kind and caching depth
        self._compiled: dict[tuple, CompiledCall] = {}  # per call and shape; each says what making it cost (.seconds)

    def text_constants(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The text-only values for (rows, 77, D) prompt embeddings (text_constants.py), fresh tensors; None
        where this U-Net has no text-only work."""
        return self.constants.constants(embeddings) if self.constants.active else None

    @property
    def cache_depths(self) -> int:
        return self.eager.cache_depths

    def kept_shape(self, rows: int, height: int, width: int, depth: int) -> tuple[int, int, int, int]:
        return self.eager.kept_shape(rows, height, width, depth)

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None, values=None):
        return self._run("unet", 0, sample, timestep, encoder_hidden_states, class_labels, values)

    def full(self, sample, timestep, encoder_hidden_states, class_labels, depth: int, values=None):
        """The full call under feature caching: (out, what a shallow call at `depth` reuses)."""
        return self._run("full", depth, sample, timestep, encoder_hidden_states, class_labels, values)

    def shallow(self, sample, timestep, encoder_hidden_states, class_labels, kept, depth: int, values=None):
        """The shallow call on a full call's `kept` (torch_backend.TorchUNet.shallow)."""
        kept = kept.contiguous(memory_format=torch.channels_last)  # no copy for the executor's buffers
        return self._run("shallow", depth, sample, timestep, encoder_hidden_states, class_labels, values, kept)

    def _run(self, kind: str, depth: int, sample, timestep, *rest):
        sample = sample.contiguous(memory_format=torch.channels_last)  # no copy for the executor's buffers
        timestep = timestep.contiguous()  # (rows,): a single run's step expands one timestep
        args = (sample, timestep, *rest)
        call = self._calls.get((kind, depth))
        if call is None:
            call = self._calls[kind, depth] = _Call(self.eager, self.constants, kind, depth)
        if not self.compile:
            return call(*args)
        key = (kind, depth, signature(args))  # shapes, dtypes and strides of every argument, the constants' too
        if key not in self._compiled:
            self._compiled[key] = CompiledCall(call, args, self.device, lambda: self.source, f"{kind}:{depth}")
        return self._compiled[key](*args)

    @functools.cached_property
    def source(self) -> str:
        """The hash of its directory's files, read once (not once per compiled shape)."""
        return source_hash([self.directory])
