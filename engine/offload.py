"""Offload: each model in host memory, on the compute device only while it runs, as diffusers'
enable_model_cpu_offload() and enable_sequential_cpu_offload() do (DeepFloyd's advice for 16 GB cards: T5-XXL
and IF-I-XL do not fit one together).

    engine.load(..., device="cuda", offload="model")       # T5, then each U-Net, then the x4's VAE: one at a time
    engine.load(..., device="cuda", offload="sequential")  # every layer streamed in as it runs: least memory
    engine.load(..., device="cuda", text_encoder_device="cpu")  # T5 on the CPU, its embeddings sent over

Parts: the pipeline's models, named as `Pipeline.components` names them ("text_encoder", "stage_I.unet",
"stage_III.vae", ...), each declared by its component's `modules()` (backends/protocol.py).

How: every parameter and buffer of a part keeps one copy in host memory (pinned on CUDA, so copies can be
asynchronous). Putting a part on the device copies its tensors there (non_blocking); taking it off points them
back at their host copies: inference never writes weights, so nothing is copied back. A part goes on when one
of its entry modules is called (a forward pre-hook; a U-Net's are its forward and the module its feature-caching
calls go through, torch_backend.SteppedForward), so every path offloads the same way (generate, the
step-level scheduler, encode_prompt); with "model" the part that was on goes off first, and where free device
memory allows, the next part in cascade order is copied ahead on a side stream while the current one runs.
With "sequential" each leaf module's own tensors go on before its forward and off after it.

`moves` records (part, "device" | "host") in order. On the CPU, host and device are one memory: a move changes
only the bookkeeping, which the tests check (order, and that no part is on the device outside its phase).
"""

from __future__ import annotations

import logging

import torch

from engine.errors import InvalidRequestError

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("model", "sequential")
PREFETCH_MARGIN = 2.0  # copy the next part ahead only where free memory is this many times its size


class Part:
    """One model's tensors (every parameter and buffer, each with its host copy) and the modules whose call
    puts it on the device."""

    def __init__(self, name: str, module: torch.nn.Module, entries: list[torch.nn.Module], pin: bool):
        self.name, self.module, self.entries = name, module, entries
        self.slots = []  # (owning module, key, is_parameter, host copy): a tied tensor has one host copy
        copies: dict[int, torch.Tensor] = {}
        for owner in module.modules():
            for key, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
                if tensor is None:
                    continue
                if id(tensor) not in copies:
                    host = tensor.detach().to("cpu")
                    copies[id(tensor)] = host.pin_memory() if pin else host
                self.slots.append((owner, key, key in owner._parameters, copies[id(tensor)]))
        self.bytes = sum(host.numel() * host.element_size() for host in copies.values())

    def tensors(self) -> list[torch.Tensor]:
        """The part's tensors as its modules hold them now (one each, tied ones once)."""
        held = {}
        for owner, key, is_parameter, _ in self.slots:
            tensor = owner._parameters[key].data if is_parameter else owner._buffers[key]
            held[id(tensor)] = tensor
        return list(held.values())

    def place(self, device: torch.device) -> None:
        """Point every tensor at a copy on `device` (the host copy itself where `device` is the CPU); tied
        tensors stay tied (one copy)."""
        placed: dict[int, torch.Tensor] = {}
        for owner, key, is_parameter, host in self.slots:
            if id(host) not in placed:
                placed[id(host)] = host if device.type == "cpu" else host.to(device, non_blocking=True)
            if is_parameter:
                owner._parameters[key].data = placed[id(host)]
            else:
                owner._buffers[key] = placed[id(host)]


class Offloader:
    """Which parts are on the compute device, moved as their modules are called (module docstring)."""

    def __init__(self, parts: list[Part], device: torch.device, mode: str):
        if mode not in OFFLOAD_MODES:
            raise InvalidRequestError(f"offload must be one of {', '.join(OFFLOAD_MODES)} (or None), got {mode!r}")
        self.parts, self.device, self.mode = parts, device, mode
        self.resident: list[str] = []  # the parts on the device now, in the order they went on
        self.moves: list[tuple[str, str]] = []
        self._ahead: dict[str, torch.cuda.Event] = {}  # parts copied ahead on the side stream, until used
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        for part in parts:
            part.place(torch.device("cpu"))
            if mode == "model":
                for entry in part.entries:
                    entry.register_forward_pre_hook(lambda module, args, part=part: self.activate(part))
            else:
                self._stream_leaves(part)

    @property
    def bytes(self) -> int:
        return sum(part.bytes for part in self.parts)

    @property
    def ahead(self) -> list[str]:
        """The parts copied ahead (on the device beside the resident ones, until their turn)."""
        return list(self._ahead)

    def activate(self, part: Part) -> None:
        """`part` on the device, every other part off (mode "model"); the next part copied ahead if it fits."""
        if part.name in self.resident:
            return
        for other in [p for p in self.parts if p.name in self.resident and p is not part]:
            self._off(other)
        for other in [p for p in self.parts if p.name in self._ahead and p is not part]:
            del self._ahead[other.name]  # copied ahead for a turn that did not come (the scheduler's order)
            other.place(torch.device("cpu"))
        self._on(part)
        following = self.parts[(self.parts.index(part) + 1) % len(self.parts)]
        ready = following is part or following.name in self.resident or following.name in self._ahead
        if self._stream is not None and not ready and self._fits_ahead(following):
            with torch.cuda.stream(self._stream):
                following.place(self.device)
            self._ahead[following.name] = self._stream.record_event()

    def _on(self, part: Part) -> None:
        event = self._ahead.pop(part.name, None)
        if event is not None:  # copied ahead: the compute stream waits for that copy, not for a new one
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for tensor in part.tensors():  # made on the side stream, used on this one: freed only after its use
                tensor.record_stream(compute)
        else:
            part.place(self.device)
        self.resident.append(part.name)
        self.moves.append((part.name, "device"))

    def _off(self, part: Part) -> None:
        part.place(torch.device("cpu"))
        self.resident.remove(part.name)
        self.moves.append((part.name, "host"))

    def _fits_ahead(self, part: Part) -> bool:
        free, _ = torch.cuda.mem_get_info(self.device)
        return free > PREFETCH_MARGIN * part.bytes

    def _stream_leaves(self, part: Part) -> None:
        """Mode "sequential": each module with tensors of its own goes on before its forward, off after it."""
        for name, module in part.module.named_modules():
            if not any(t is not None for t in [*module._parameters.values(), *module._buffers.values()]):
                continue
            leaf = Part(f"{part.name}.{name}" if name else part.name, module, [module], pin=False)
            leaf.slots = [slot for slot in part.slots if slot[0] is module]  # the part's (pinned) host copies
            module.register_forward_pre_hook(lambda m, args, leaf=leaf: self._on(leaf))
            module.register_forward_hook(lambda m, args, out, leaf=leaf: self._off(leaf))


def install(pipeline, mode: str) -> Offloader:
    """Offload `pipeline`'s parts in `mode`, in place; their weights go to host memory now. A text encoder that
    runs on another device than the pipeline's (text_encoder_device="cpu") stays where it is.
    InvalidRequestError where a component cannot be offloaded (an export's, or the fast path's)."""
    if any(stage.executor.static for stage in pipeline.stages):
        raise InvalidRequestError("offload moves weights between calls, which the fast path's compiled calls and "
                                  "captured graphs cannot follow: load with fast=False")
    parts = []
    for name, component in components(pipeline):
        if getattr(component, "device", pipeline.device) != pipeline.device:
            continue  # runs elsewhere (T5 on the CPU beside a GPU): nothing of it on the device to offload
        modules = getattr(component, "modules", None)
        found = None if modules is None else modules()
        if found is None:
            raise InvalidRequestError(f"{name} cannot be offloaded: the {pipeline.backend} backend runs what its "
                                      "export holds; offload is the torch backend's")
        module, entries = found
        parts.append(Part(name, module, entries, pin=pipeline.device.type == "cuda"))
    offloader = Offloader(parts, pipeline.device, mode)
    log.info("offload=%s: %d parts, %.2f GB of weights in host memory", mode, len(parts), offloader.bytes / 1e9)
    return offloader


def components(pipeline) -> list[tuple[str, object]]:
    """The pipeline's models in the order a request uses them, by part name: the text encoder(s), then each
    stage's U-Net (and an x4 upscaler's VAE decoder). A pipeline without a text encoder has no such part."""
    found = [] if pipeline.text.model is None else [("text_encoder", pipeline.text)]
    for stage in pipeline.stages:
        if stage.text is not None and stage.text is not pipeline.text:
            found.insert(len([n for n, _ in found if n.endswith("text_encoder")]),
                         (f"{stage.name}.text_encoder", stage.text))  # every encoder runs before the stages
    for stage in pipeline.stages:
        found.append((f"{stage.name}.unet", stage.unet))
        if getattr(stage, "decoder", None) is not None:
            found.append((f"{stage.name}.vae", stage.decoder))
    return found
