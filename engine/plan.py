"""The memory plan: the device memory a cascade needs, per phase, before any weights are read.

    python -m engine plan MODEL... [--dtype float16] [--offload model] [--images 1] [--gpu-memory 16GB]
    memory_plan(parts(stage_dirs(paths).dirs ...), offload="model", images=1).peak

Each part (the text encoders, each stage's U-Net, the x4 upscaler's VAE) is built from its config on the meta
device: no memory, no weights read, no compute. Its weight bytes are its parameters and buffers in the dtype it
runs in (T5 in bfloat16 where the U-Nets run float16, the x4 VAE in float32 where its config upcasts). Its
activation peak is measured, not modelled: the part's forward runs on meta tensors of the phase's shapes under a
dispatch mode that adds up the bytes of the storages alive at each op (freed as their last reference goes).

A phase is one part running: the text encoders (one batch of the request's prompts), each stage's U-Net (2 x
images rows, under guidance), the x4 VAE's decode. Its peak is what is on the device then:
    weights      every part (no offload); the phase's part ("model"); its largest layer ("sequential")
    activations  the phase's measured peak
    run state    the stage's samples, noise for every step (drawn up front) and low-res input, float32
    workspace    WORKSPACE_BYTES, for cuDNN/cuBLAS workspaces and allocator rounding (an estimate)
    static       on the fast path (fast=True) only, in every phase (made at a stage's first call, kept after):
                 each U-Net stage's static buffers (`static_buffers`: the shapes engine/executor.py allocates,
                 the scheduler's RowBuffers per row bucket and a single run's StepRunner) and the one CUDA-graph
                 pool the captured calls share, as large as the largest captured call's temporaries: the U-Net's
                 activation peak at the largest row bucket. The warm-up calls before each capture run outside
                 the pool, so a U-Net phase keeps its own activations beside it.
A text encoder placed on the CPU (text_encoder_device="cpu") costs the device nothing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from engine.backends.torch_backend import text_constant_bytes, text_dtype
from engine.errors import InvalidRequestError
from engine.executor import ROW_BUCKETS, bucket
from engine.model_dir import model_config, text_config
from engine.offload import OFFLOAD_MODES
from engine.schedules import named_timesteps
from engine.options import STAGE_DEFAULTS

WORKSPACE_BYTES = 512 << 20
TOKENS = 77
GB = 1e9


@dataclass(frozen=True)
class PlanPart:
    """One model as the plan builds it: its part name, kind ("t5", "clip", "unet", "vae"), config and dtype, and
    the sides of the samples it runs on (U-Nets and the VAE)."""

    name: str
    kind: str
    config: object  # a diffusers config dict, or a transformers config
    dtype: torch.dtype
    side: int | None = None  # the sample's side: pixels for IF U-Nets, latents for the x4 U-Net and VAE
    steps: int = 0  # a U-Net's default step count (its run state holds that many noise tensors)


@dataclass
class Phase:
    name: str
    weights: int
    activations: int
    run_state: int
    workspace: int = WORKSPACE_BYTES
    static: int = 0  # the fast path's static buffers and CUDA-graph pool (module docstring)

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.run_state + self.workspace + self.static


@dataclass
class MemoryPlan:
    """Bytes per part and per phase; `peak` is the largest phase."""

    offload: str | None
    images: int
    fast: bool = False
    part_weights: dict[str, int] = field(default_factory=dict)
    largest_layer: dict[str, int] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    static_buffers: dict[str, int] = field(default_factory=dict)  # per U-Net part, on the fast path
    graph_pool: int = 0  # on the fast path: the CUDA-graph pool the captured calls share

    @property
    def static(self) -> int:
        """The fast path's bytes in every phase: every stage's static buffers and the graph pool."""
        return sum(self.static_buffers.values()) + self.graph_pool

    @property
    def peak(self) -> int:
        return max(phase.total for phase in self.phases)

    def fits(self, memory: int) -> bool:
        return self.peak <= memory

    def table(self, memory: int | None = None) -> str:
        unit, scale = ("GB", GB) if self.peak >= GB else ("MB", 1e6)
        static = " + fast path's static buffers and graph pool" if self.fast else ""
        lines = [f"memory plan: offload={self.offload}, {self.images} image(s) per call, {unit} "
                 f"(weights + activations + run state + workspace{static})"]
        for phase in self.phases:
            extra = f" + {phase.static / scale:6.2f}" if self.fast else ""
            lines.append(f"  {phase.name:<24} {phase.weights / scale:8.2f} + {phase.activations / scale:7.2f} + "
                         f"{phase.run_state / scale:6.2f} + {phase.workspace / scale:6.2f}{extra} = "
                         f"{phase.total / scale:8.2f}")
        lines.append(f"  peak {self.peak / scale:.2f} {unit}")
        if self.fast:
            lines.append(f"  of which the fast path's: static buffers {sum(self.static_buffers.values()) / scale:.2f}"
                         f" {unit}, CUDA-graph pool {self.graph_pool / scale:.2f} {unit}")
        if memory is not None:
            verdict = "fits" if self.fits(memory) else "does NOT fit"
            lines.append(f"  {verdict} in {memory / GB:.2f} GB")
        return "\n".join(lines)


def parts_of(stage_dirs_and_kinds, dtype: torch.dtype) -> list[PlanPart]:
    """The plan's parts of a cascade read by model_dir.read_stages (its StageSpecs), configs only."""
    encoders, found, side = [], [], None  # the encoders all run first, as offload.components orders them
    for index, spec in enumerate(stage_dirs_and_kinds):
        folder = spec.directory
        steps = _default_steps(spec.kind, spec.defaults)
        if spec.kind == "latent_upscaler":
            vae = model_config(folder / "vae", "AutoencoderKL", "VAE config")
            vae_dtype = torch.float32 if dtype == torch.float16 and vae.get("force_upcast", True) else dtype
            unet = model_config(folder / "unet", "UNet2DConditionModel", "U-Net config")
            latent = side or unet["sample_size"]
            encoders.append(PlanPart(f"{spec.name}.text_encoder", "clip", text_config(folder / "text_encoder"), dtype))
            found += [PlanPart(f"{spec.name}.unet", "unet", unet, dtype, latent, steps),
                      PlanPart(f"{spec.name}.vae", "vae", vae, vae_dtype, latent)]
            continue
        if index == 0 and spec.text_dim is None and (folder / "text_encoder").is_dir():
            encoders.append(PlanPart("text_encoder", "t5", text_config(folder / "text_encoder"), text_dtype(dtype)))
        unet = model_config(folder / "unet", "UNet2DConditionModel", "U-Net config")
        side = unet["sample_size"]
        found.append(PlanPart(f"{spec.name}.unet", "unet", unet, dtype, side, steps))
    return encoders + found


def _default_steps(kind: str, defaults: dict | None) -> int:
    steps = (defaults or {}).get("steps", STAGE_DEFAULTS[kind].steps)
    if isinstance(steps, str):  # a named schedule: its timesteps (the string's length is not their count)
        return len(named_timesteps(steps))
    return steps if isinstance(steps, int) else len(steps)


def memory_plan(parts: list[PlanPart], offload: str | None = None, images: int = 1,
                text_on_device: bool = True, fast: bool = False) -> MemoryPlan:
    """The plan of a request of `images` images (guided) over `parts`, in cascade order (module docstring);
    `fast`: the U-Nets run on the fast path (static buffers and CUDA graphs)."""
    if offload is not None and offload not in OFFLOAD_MODES:
        raise InvalidRequestError(f"offload must be one of {', '.join(OFFLOAD_MODES)} (or None), got {offload!r}")
    if offload is not None and fast:
        raise InvalidRequestError("offload moves weights between calls, which the fast path cannot follow: "
                                  "plan one or the other")
    plan = MemoryPlan(offload, images, fast)
    activations, run_states, pools = {}, {}, [0]
    for part in parts:
        module = build(part)
        plan.part_weights[part.name] = tensor_bytes(module)
        plan.largest_layer[part.name] = max(tensor_bytes(m, recurse=False) for m in module.modules())
        activations[part.name] = activation_peak(module, part, images)
        run_states[part.name] = _run_state(part, images)
        if fast and part.kind == "unet":  # the pool first: static_buffers installs the text constants
            pools.append(activation_peak(module, part, images, rows=row_buckets(images)[-1]))
            plan.static_buffers[part.name] = static_buffers(module, part, images)
        del module
    plan.graph_pool = max(pools)
    on_device = [p.name for p in parts if text_on_device or p.kind != "t5"]
    for part in parts:
        if part.name not in on_device:
            continue
        if offload is None:
            weights = sum(plan.part_weights[name] for name in on_device)
        elif offload == "model":
            weights = plan.part_weights[part.name]
        else:
            weights = plan.largest_layer[part.name]
        plan.phases.append(Phase(part.name, weights, activations[part.name], run_states[part.name],
                                 static=plan.static))
    return plan


def _run_state(part: PlanPart, images: int) -> int:
    """A stage's float32 run state: x, the next x, the low-res input and every step's noise, (B, C, H, W) each."""
    if part.kind != "unet":
        return 0
    return (part.steps + 3) * images * _channels(part) * part.side * part.side * 4


def _channels(part: PlanPart) -> int:
    """A U-Net stage's sample channels C: its output's, less IF's 3 variance channels."""
    return part.config["out_channels"] // (2 if part.config["out_channels"] == 6 else 1)


def row_buckets(images: int) -> list[int]:
    """The row counts the fast path's scheduler calls of up to `images` images run at (executor.bucket): every
    one of ROW_BUCKETS up to the one 2 x images rows (guided) pad to; each has its own buffers and graph."""
    top = bucket(2 * images)
    return [rows for rows in ROW_BUCKETS if rows < top] + [top]


def static_buffers(module: torch.nn.Module, part: PlanPart, images: int) -> int:
    """The bytes of a U-Net stage's static buffers on the fast path, as engine/executor.py allocates them (its
    docstring lists them): a RowBuffers per row bucket (`row_buckets`), sample and out (rows, C, H, W),
    timestep and class labels (rows,) int64, embeddings (rows, 77, D) and the U-Net's text constants for the
    rows; and a StepRunner for a single run of `images` images under guidance, x (B, C, H, W) float32,
    model_in, embeddings, class labels and text constants for 2B rows, every step's noise (N, B, C, H, W)
    float32, its step index and guidance scale. Installs the text constants on `module` (measured on it, on the
    meta device). Not counted: feature caching's kept buffers (a set per step kind), an edit's mask, and
    runners of other shapes (up to executor.MAX_RUNNERS per stage)."""
    config, size = part.config, part.dtype.itemsize
    width = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    labels = config["in_channels"] != 3  # a super-resolution or x4 stage takes its noise level as class labels
    pixels = part.side * part.side
    per_row_constants = text_constant_bytes(module, width, part.dtype)  # one row's, on meta tensors

    def conditioning(rows: int) -> int:  # embeddings, class labels and text constants of `rows` rows
        return rows * (TOKENS * width * size + (8 if labels else 0) + per_row_constants)

    buffers = sum(rows * ((config["in_channels"] + config["out_channels"]) * pixels * size + 8) + conditioning(rows)
                  for rows in row_buckets(images))
    x = images * _channels(part) * pixels * 4  # one (B, C, H, W) float32
    runner = x * (1 + part.steps) + 2 * images * config["in_channels"] * pixels * size + conditioning(2 * images)
    return buffers + runner + 8 + 4  # the runner's step index (int64) and guidance scale (float32)


def tensor_bytes(module: torch.nn.Module, recurse: bool = True) -> int:
    """Bytes of a module's parameters and buffers (its own only, with recurse=False)."""
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    return sum(t.numel() * t.element_size() for t in tensors)


def build(part: PlanPart) -> torch.nn.Module:
    """The part's module on the meta device, in its dtype."""
    with torch.device("meta"):
        if part.kind == "t5":
            from transformers import T5EncoderModel

            module = T5EncoderModel(part.config)
        elif part.kind == "clip":
            from transformers import CLIPTextModel

            module = CLIPTextModel(part.config)
        elif part.kind == "vae":
            from diffusers import AutoencoderKL

            module = AutoencoderKL.from_config(part.config)
        else:
            from diffusers import UNet2DConditionModel

            module = UNet2DConditionModel.from_config(part.config)
    return torch.nn.Module.to(module, part.dtype).eval()  # not diffusers' .to (it warns)


def activation_peak(module: torch.nn.Module, part: PlanPart, images: int, rows: int | None = None) -> int:
    """The most bytes of tensors alive at once while the part runs one phase's call, on meta tensors; a U-Net's
    at `rows` rows (default 2 x images, a guided step)."""
    meta = dict(device="meta", dtype=part.dtype)
    rows = rows or 2 * images  # a guided step: [uncond; cond]
    with torch.inference_mode(), LiveBytes() as live:
        if part.kind in ("t5", "clip"):
            # No attention mask: transformers reads a mask's values to choose a path, which meta tensors lack;
            # the mask's own bytes are a few hundred.
            module(torch.zeros(images, TOKENS, dtype=torch.long, device="meta"))
        elif part.kind == "vae":
            module.decode(torch.empty(images, part.config["latent_channels"], part.side, part.side, **meta))
        else:
            config = part.config
            width = config.get("encoder_hid_dim") or config["cross_attention_dim"]
            labels = torch.zeros(rows, dtype=torch.long, device="meta") if config["in_channels"] != 3 else None
            module(torch.empty(rows, config["in_channels"], part.side, part.side, **meta),
                   torch.zeros(rows, dtype=torch.long, device="meta"),
                   encoder_hidden_states=torch.empty(rows, TOKENS, width, **meta), class_labels=labels)
    return live.peak


class LiveBytes:
    """A dispatch mode that follows the bytes of the storages ops make: added when an op's output has a storage
    none of its inputs had, taken off when that storage's last reference goes (storages keep one Python object
    each, so a weak reference to it follows it). `peak`: the most alive at once."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.saw(args, kwargs, out)
                return out

        self.mode, self.live, self.peak, self.alive = Mode(), 0, 0, set()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def saw(self, args, kwargs, out) -> None:
        from torch.utils._pytree import tree_leaves

        given = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in given or key in self.alive:
                continue
            size = storage.nbytes()
            self.alive.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key, size: int) -> None:
        self.alive.discard(key)
        self.live -= size


def parse_memory(text: str) -> int:
    """Bytes from "16GB", "16 GiB", "24g", "16000000000"; InvalidRequestError otherwise."""
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "t": 10**12, "tb": 10**12}
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in units or not amount > 0:
        raise InvalidRequestError(f"a memory size such as 16GB or 24GiB, got {text!r}")
    return int(amount * units[unit])


def refuse_what_cannot_fit(specs, dtype: torch.dtype, offload: str | None, text_on_device: bool, images: int,
                           device: torch.device, free: int | None = None, fast: bool = False) -> MemoryPlan:
    """The plan of a cascade about to load on a CUDA device (`fast`: on the fast path); InvalidRequestError, with
    the plan, where its peak is more than the device has free (`free` bytes: by default what CUDA says now)."""
    result = memory_plan(parts_of(specs, dtype), offload, images, text_on_device, fast)
    if free is None:
        free, _ = torch.cuda.mem_get_info(device)
    if not result.fits(free):
        advice = ("offload='model' (or 'sequential'), text_encoder_device='cpu'" if offload is None
                  else "offload='sequential', text_encoder_device='cpu'" if offload == "model"
                  else "text_encoder_device='cpu', or fewer images per call") + " (--offload, --text-encoder-device)"
        static = ""
        if fast:  # its buffers and graph pool are in every phase: without them it may fit as it is
            advice = "fast=False (--no-fast)" + ("" if result.peak - result.static <= free else f", and {advice}")
            static = (f" ({result.static / GB:.2f} GB of them the fast path's static buffers and CUDA-graph pool, "
                      f"for row buckets up to {row_buckets(images)[-1]} rows)")
        raise InvalidRequestError(f"this cascade needs {result.peak / GB:.2f} GB on {device}{static}, which has "
                                  f"{free / GB:.2f} GB free: load it with {advice}\n{result.table(free)}")
    return result
