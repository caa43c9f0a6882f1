"""What one timed call is: a component's inputs, and its three variants side by side.

    eager    the plain diffusers / transformers module (diffusers' default SDPA attention processors)
    compile  the same module under torch.compile (the bench's compile mode, COMPILE_MODES), sharing its weights
    ours     the engine's fast path (backends/fast_unet.py: text constants made once per request, compiled,
             channels_last) as the pipeline runs it, each call replayed from a CUDA graph on a GPU (`graphed`), with
             "ours, eager runtime" beside it: TorchUNet (our attention processors, Triton on CUDA, channels_last on
             CUDA) around its own copy of the weights; off the fast path, that TorchUNet alone

All three get the same inputs, built once. A U-Net step runs at the classifier-free-guidance batch (2 x images).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from engine.backends.attention import resolve_attention
from engine.backends.torch_backend import TorchUNet, TorchVAEDecoder, on_fast_path
from engine.executor import _capture
from engine.model_dir import text_width
from engine.text import MAX_TOKENS as TEXT_TOKENS

VARIANTS = ("eager", "compile", "ours")
# Table labels: "{library} eager", "{library}+compile", "ours" (library: diffusers, or transformers for text);
# "onnxruntime": our Pipeline on the cached ONNX export of the same cascade, a row added where one exists.
LABELS = {"eager": "{library} eager", "compile": "{library}+compile", "ours": "ours", "onnxruntime": "ours, ONNX Runtime",
          "ours_eager": "ours, eager runtime"}
# torch.compile's modes for the "compile" peer. "default" unless asked: max-autotune benchmarks GEMM and conv
# templates per shape, minutes per real-size U-Net (bench/RESULTS.md), more than a device call's time box holds;
# it stays available (--compile-mode) for a call of its own.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_COMPARE = {"cuda": ("eager", "compile", "ours"), "cpu": ("eager", "ours")}
TIMESTEP = 500  # mid-schedule; a U-Net's cost does not depend on it
NOISE_LEVEL = 250  # class label of the super-resolution U-Nets (IF-II's default; the x4's is 20, same cost)


def unet_inputs(unet_config, batch: int, size: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Named inputs of one U-Net call at tensor batch `batch` (already 2 x images under guidance)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    takes_class = unet_config.get("class_embed_type") is not None or unet_config.get("num_class_embeds") is not None
    return {
        "sample": torch.randn(batch, unet_config["in_channels"], size, size, generator=gen).to(device, dtype),
        "timestep": torch.tensor(TIMESTEP, device=device),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, text_width(unet_config),
                                             generator=gen).to(device, dtype),
        # (B,) noise level: IF-II's timestep-style class embedding, the x4's 1000-entry table
        "class_labels": torch.full((batch,), NOISE_LEVEL, device=device) if takes_class else None,
    }


def unet_call(model, inputs) -> Callable[[], torch.Tensor]:
    """diffusers' call convention (eager or compiled module)."""
    def call():
        return model(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     class_labels=inputs["class_labels"], return_dict=False)[0]
    return call


def ours_unet_call(model, inputs, device: torch.device) -> Callable[[], torch.Tensor]:
    """The engine's TorchUNet, on a copy of `model` (it installs processors and may change the memory format),
    with the attention engine.load would pick on this device."""

    unet = TorchUNet(fresh_copy(model), resolve_attention(None, device))

    def call():
        return unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["class_labels"])
    return call


# "eager": torch.compile traces (dynamo, with its graph breaks and guards) but generates no code: what the GPU
# campaign's rehearsal on a CPU sets (bench/campaign.py), where inductor's C++ takes minutes per U-Net.
COMPILE_BACKEND_ENV = "CASCADE_BENCH_COMPILE_BACKEND"


def compiled(fn, mode: str = "default"):
    """torch.compile of a module or function in `mode` (COMPILE_MODES); it compiles on its first call."""
    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    if backend != "inductor":
        return torch.compile(fn, backend=backend)  # modes are inductor's
    return torch.compile(fn, mode=mode)


def graphed(call: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """`call` as the fast path runs it: on CUDA captured once in a CUDA graph (after warm-up calls on a side
    stream, as the executor captures) and replayed, returning the output it wrote; elsewhere `call` itself.
    `call` must read static tensors (the inputs built once)."""
    if device.type != "cuda":
        return call
    captured = {}  # the graph and the output it writes in place, made at the first call (timed as the first call:
    # compiling, warm-up and capture, as a pipeline's first request pays them)

    def replay():
        if not captured:
            out = []
            captured["graph"] = _capture(device, lambda: out.append(call()))
            captured["out"] = out[-1]
        captured["graph"].replay()
        return captured["out"]
    return replay


def fresh_copy(model, dtype: torch.dtype | None = None):
    """A plain diffusers (or transformers) model with `model`'s weights and config, in `dtype` (default: its
    own): diffusers' default attention processors and contiguous weights, whatever the engine did to `model`.
    Built on meta, allocated empty, weights copied."""
    with torch.device("meta"):
        plain = type(model).from_config(model.config) if hasattr(type(model), "from_config") else type(model)(model.config)
    plain = torch.nn.Module.to(plain, dtype or model.dtype).to_empty(device=model.device)
    plain.load_state_dict(model.state_dict())
    return plain.eval().requires_grad_(False)


def unet_variants(model, inputs, device: torch.device, compare, ours=None,
                  compile_mode: str = "default") -> dict[str, Callable[[], object]]:
    """eager / compile on `model` (a plain diffusers U-Net), ours on `ours` (a TorchUNet or the fast path's
    FastUNet; default: a TorchUNet built on a copy of `model`). The eager call is always first: it also serves
    to count FLOPs."""
    eager = unet_call(model, inputs)
    calls = {"eager": eager}
    if "compile" in compare:
        calls["compile"] = unet_call(compiled(model, compile_mode), inputs)
    if "ours" in compare:
        if ours is None:
            calls["ours"] = ours_unet_call(model, inputs, device)
        elif getattr(ours, "static", False):  # the fast path: the text constants made once, as once per request
            values = ours.text_constants(inputs["encoder_hidden_states"])
            # (rows,) contiguous and the sample channels_last, as the executor's buffers hold them
            timestep = inputs["timestep"].expand(len(inputs["sample"])).contiguous()
            sample = inputs["sample"].contiguous(memory_format=torch.channels_last)
            calls["ours"] = graphed(lambda: ours(sample, timestep, inputs["encoder_hidden_states"],
                                                 inputs["class_labels"], values), device)
            calls["ours_eager"] = ours_unet_call(model, inputs, device)  # the eager runtime, its own row
        else:
            calls["ours"] = lambda: ours(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                                         inputs["class_labels"])
    return calls


def module_variants(call_with: Callable[[object], object], model, device: torch.device,
                    compare, compile_mode: str = "default") -> dict[str, Callable[[], object]]:
    """Eager and compiled variants of a component the engine runs unchanged (the text encoders): there is no
    "ours" to compare, so it is left out (the table says so)."""
    calls = {"eager": lambda: call_with(model)}
    if "compile" in compare:  # the whole call compiled (torch.compile(vae) would compile forward, not decode)
        calls["compile"] = compiled(lambda: call_with(model), compile_mode)
    return calls


def token_inputs(vocab_size: int, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(B, 77) token ids, all positions real: the text encoders' full-length cost."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, TEXT_TOKENS), generator=gen).to(device)


def part_calls(part, model, config: dict, batch: int, size: int | None, device: torch.device,
               dtype: torch.dtype, compare, compile_mode: str = "default",
               fast: bool = False, source: str = "") -> tuple[dict[str, Callable[[], object]], int]:
    """The calls of one real-size part ("eager" always first, whatever `compare` says: it counts FLOPs and
    checks the output) and the tensor batch they run at. fast: a U-Net's "ours" is the fast path (a FastUNet
    on a copy of `model`, its compiled packages keyed by `source`), as a loaded pipeline runs it."""
    if part.kind == "unet":
        inputs = unet_inputs(config, 2 * batch, size, device, dtype)  # 2 x images: batched CFG
        ours = None
        if fast and "ours" in compare:
            ours = on_fast_path(TorchUNet(fresh_copy(model), resolve_attention(None, device), device), source)
        return unet_variants(model, inputs, device, compare, ours, compile_mode), 2 * batch
    if part.kind == "vae_decode":
        gen = torch.Generator("cpu").manual_seed(0)
        latents = torch.randn(batch, config["latent_channels"], size, size, generator=gen).to(device, dtype)
        calls = module_variants(lambda m: m.decode(latents, return_dict=False)[0], model, device, compare,
                                compile_mode)
        if "ours" in compare:  # the engine's decoder (our attention kernel for the 512-wide mid-block head)

            decoder = TorchVAEDecoder(fresh_copy(model), resolve_attention(None, device))
            scaled = latents * decoder.scaling_factor  # it divides by the scaling factor itself
            calls["ours"] = lambda: decoder(scaled)
        return calls, batch
    if part.kind in ("t5", "clip"):
        ids = token_inputs(config["vocab_size"], batch, device)
        mask = torch.ones_like(ids)
        return module_variants(lambda m: m(ids, attention_mask=mask)[0], model, device, compare, compile_mode), batch
    raise ValueError(f"unknown part kind {part.kind!r}")
