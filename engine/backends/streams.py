"""The CUDA stream an external runtime (ONNX Runtime, TensorRT) runs a component on, ordered with torch's work.

Torch's current stream is usually the default stream, whose handle is 0. ONNX Runtime reads a user compute
stream of 0 as "none given" and runs on a stream of its own with no wait on torch's, so it can read inputs
before torch has written them (onnxruntime PRs #19229, #19619, issue #26609); TensorRT warns on the legacy
default stream and synchronises more than it needs to. So where torch's current stream is the default one, a
component runs on a non-default stream of its own, ordered with torch's work on both sides: it waits for
torch's current stream before the run, and torch's current stream waits for it after. Where torch's current
stream is already a non-default one (a caller's `torch.cuda.stream(...)`), the component runs on it directly.

An ONNX Runtime session takes its stream once, at creation: `fixed` is that stream, and every run is ordered
against torch's current stream at run time whenever the two differ.

The choice is `compute_stream`, a function of stream handles (plain ints) so that it is tested without a GPU;
`RunStream` applies it with torch's streams.
"""

from __future__ import annotations

import contextlib

import torch

DEFAULT_STREAM = 0  # the handle of the (legacy) default stream: "no stream" to ONNX Runtime


def compute_stream(current: int, own: int, fixed: int | None = None) -> tuple[int, bool]:
    """(the handle a run goes on, whether it must be ordered with torch's current stream) for torch's current
    stream `current`, the component's own non-default stream `own`, and the stream fixed at its creation
    (`fixed`: an ONNX Runtime session's; None: chosen per run, as TensorRT's execute_async_v3 takes it)."""
    if own == DEFAULT_STREAM:
        raise ValueError("a component's own stream must be a non-default stream")
    if fixed is None:
        fixed = own if current == DEFAULT_STREAM else current
    return fixed, fixed != current


class RunStream:
    """One component's stream on a CUDA device (module docstring). `fix`: choose it now, for a runtime that takes
    its stream once (ONNX Runtime's session); else per run. `handle` is the fixed stream's handle."""

    def __init__(self, device: torch.device, fix: bool):
        self.device = device
        self.own = torch.cuda.Stream(device)
        self.fixed: torch.cuda.Stream | None = None
        if fix:
            current = torch.cuda.current_stream(device)
            handle, _ = compute_stream(current.cuda_stream, self.own.cuda_stream)
            self.fixed = self.own if handle == self.own.cuda_stream else current

    @property
    def handle(self) -> int:
        return self.fixed.cuda_stream

    @contextlib.contextmanager
    def ordered(self):
        """Yields the handle to run on; around the run, that stream and torch's current one wait for each other
        where they differ. Tensors made on torch's stream before the run and freed after it need no
        record_stream: torch's stream waits for the run before it can reuse their memory."""
        current = torch.cuda.current_stream(self.device)
        fixed = None if self.fixed is None else self.fixed.cuda_stream
        handle, order = compute_stream(current.cuda_stream, self.own.cuda_stream, fixed)
        running = self.fixed if self.fixed is not None else self.own if handle == self.own.cuda_stream else current
        if order:
            running.wait_stream(current)  # the inputs torch wrote, before the run reads them
        try:
            yield handle
        finally:
            if order:
                current.wait_stream(running)  # the outputs, before torch reads them
