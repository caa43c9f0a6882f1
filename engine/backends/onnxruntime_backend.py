"""The ONNX Runtime backend: the components of an exported directory (export/onnx.py, engine/exported/).

The runtime around it (prompt handling, samplers, guidance, noise) is the torch code every backend shares;
only the text encoders, the U-Nets and the x4 upscaler's VAE decoder run as ONNX Runtime sessions. Tensors cross by pointer with IO binding
(no numpy copies): inputs are bound from torch tensors, outputs are written into preallocated torch tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import torch

from engine.backends import TORCH_DTYPES
from engine.errors import EngineError, InvalidRequestError, ModelError
from engine.exported.contract import resolve_dim
from engine.exported.manifest import read_manifest
from engine.model_dir import StageSpec, downsampling, load_tokenizer, scheduler_config

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # the first one available is used


def require_onnx():
    """Import onnx and onnxruntime (optional: the [onnx] extra) or say which extra installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise EngineError(f"ONNX export and the onnxruntime backend need {exc.name}: "
                          "pip install 'cascade-engine[onnx]'") from exc
    return onnx, onnxruntime


def physical_cores() -> int:
    """ONNX Runtime's intra-op threads: one per core, not per hyper-thread (spinning siblings slow it down)."""
    count = os.cpu_count() or 1
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text()
        per_core = len(siblings.replace("-", ",").split(","))
        return max(1, count // per_core)
    except OSError:
        return count


def session_options(threads: int | None = None, spinning: bool = False):
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    # Spin-waiting between runs (ORT's default) makes each U-Net call faster, but the spinning threads hold the
    # cores the sampler's torch ops run on between calls: the pipeline runs torch single-threaded meanwhile
    # (`single_threaded_torch`; bench/RESULTS.md, ONNX Runtime log).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


_torch_threads_lock = threading.Lock()
_torch_threads_users = 0
_torch_threads_saved = 0


@contextlib.contextmanager
def single_threaded_torch():
    """torch on one intra-op thread while ONNX Runtime's spinning threads own the cores (process-wide, so
    counted: concurrent runs keep it at one, and the last one out restores the user's setting)."""
    global _torch_threads_users, _torch_threads_saved
    with _torch_threads_lock:
        if _torch_threads_users == 0:
            _torch_threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _torch_threads_users += 1
    try:
        yield
    finally:
        with _torch_threads_lock:
            _torch_threads_users -= 1
            if _torch_threads_users == 0:
                torch.set_num_threads(_torch_threads_saved)


def resolve_providers(providers) -> list[str]:
    _, ort = require_onnx()
    available = ort.get_available_providers()
    if providers is None:
        return [p for p in DEFAULT_PROVIDERS if p in available]
    providers = [providers] if isinstance(providers, str) else list(providers)
    missing = [p for p in providers if p not in available]
    if missing:
        raise InvalidRequestError(f"ONNX Runtime providers {missing} are not available here (available: "
                                  f"{', '.join(available)}); CUDA needs `pip install onnxruntime-gpu`")
    return providers


class OrtComponent:
    """One exported graph as a session; call(**named torch tensors) -> torch tensor of its (only) output."""

    def __init__(self, path: Path, description: dict, providers: list[str], options, device: torch.device):
        _, ort = require_onnx()
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own types for unreadable or invalid graphs
            raise ModelError(path, f"ONNX Runtime cannot load this graph: {exc}") from exc
        self.inputs = description["inputs"]
        (self.output_name, output), = description["outputs"].items()
        self.output_shape = output["shape"]  # with named dynamic axes, see export.onnx.Contract
        self.output_dtype = TORCH_DTYPES[output["dtype"]]
        self.device = device

    def __call__(self, **tensors: torch.Tensor) -> torch.Tensor:
        binding = self.session.io_binding()
        kept = []  # contiguous copies must outlive the run
        sizes = {}  # dynamic axis name -> this call's size
        for name, spec in self.inputs.items():
            t = tensors[name].to(self.device, TORCH_DTYPES[spec["dtype"]]).contiguous()
            kept.append(t)
            sizes |= {d: n for d, n in zip(spec["shape"], t.shape) if isinstance(d, str)}
            binding.bind_input(name, self.device.type, self.device.index or 0, _numpy_dtype(t.dtype),
                               tuple(t.shape), t.data_ptr())
        out = torch.empty([resolve_dim(d, sizes) for d in self.output_shape], dtype=self.output_dtype,
                          device=self.device)
        binding.bind_output(self.output_name, self.device.type, self.device.index or 0,
                            _numpy_dtype(out.dtype), tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


def _numpy_dtype(dtype: torch.dtype):
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


class OrtTextModel:
    """A text encoder as an exported graph, called like transformers' encoders: model(ids, attention_mask=m)[0].

    T5's graph takes the mask; CLIP's takes none (TextEncoder passes None for it)."""

    def __init__(self, component: OrtComponent):
        self.component = component

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        named = {"input_ids": input_ids}
        if attention_mask is not None:
            named["attention_mask"] = attention_mask
        return (self.component(**named),)


class OrtVAEDecoder:
    """An exported VAE decoder behind the runtime's decoder call (same interface as TorchVAEDecoder)."""

    def __init__(self, component: OrtComponent, vae_config: dict):
        self.component = component
        self.latent_channels = vae_config.get("latent_channels", 4)
        self.scale = downsampling(vae_config["block_out_channels"])

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.component(latents=latents)  # (B, 4, h, w) -> (B, 3, scale * h, scale * w)


class OrtUNet:
    """An exported U-Net behind the runtime's U-Net call (same interface as TorchUNet)."""

    def __init__(self, component: OrtComponent, config: dict, dtype: torch.dtype):
        self.component = component
        self.in_channels = config["in_channels"]
        self.out_channels = config["out_channels"]
        self.sample_size = config["sample_size"]
        self.downsampling = downsampling(config["block_out_channels"])
        self.dtype = dtype

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        # sample (B, C, H, W); timestep () or (B,) int64 -> the graph's (B,); encoder_hidden_states (B, 77, D)
        named = {"sample": sample, "timestep": timestep.reshape(-1).expand(sample.shape[0]),
                 "encoder_hidden_states": encoder_hidden_states}
        if class_labels is not None:
            named["class_labels"] = class_labels
        return self.component(**named)


class OrtComponents:
    """Components (backends/protocol.py) of an exported directory, after verifying every file against its
    manifest; providers: ONNX Runtime execution providers (default: CUDA when usable, else CPU)."""

    def __init__(self, root: Path, providers=None, threads: int | None = None):
        self.root = Path(root).expanduser().resolve()
        self.manifest = read_manifest(self.root)  # hashes first: nothing unverified is loaded
        self.providers = resolve_providers(providers)
        cuda = self.providers[0] == "CUDAExecutionProvider" and torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self.dtype = TORCH_DTYPES[self.manifest["precision"]]
        self.options = session_options(threads, spinning=self.device.type == "cpu")  # CPU threads spin; above

    def stages(self) -> list[StageSpec]:
        """The exported cascade's stages, as the manifest and the copied configs describe them."""
        specs = []
        for entry in self.manifest["stages"]:
            name, kind = entry["name"], entry["kind"]
            noising = {"super_resolution": "image_noising_scheduler", "latent_upscaler": "low_res_scheduler"}.get(kind)
            specs.append(StageSpec(
                name, kind, self.root / name, scheduler_config(self.root / name / "scheduler"),
                None if noising is None else scheduler_config(self.root / name / noising), entry.get("defaults"),
                max_noise_level=entry.get("max_noise_level")))
        return specs

    def run_context(self):
        # On CPU the sampler's small torch ops run between ORT calls whose threads spin: torch on one thread.
        return single_threaded_torch if self.device.type == "cpu" else None

    def text_encoder(self, stage: StageSpec):
        if stage.kind == "latent_upscaler":  # its own CLIP, in its stage's folder
            component = self._component(self._entry(stage)["text_encoder"])
            tokenizer = load_tokenizer(self.root / stage.name)
        else:  # the cascade's T5, at the top of the export
            component, tokenizer = self._component("text_encoder"), load_tokenizer(self.root)
        return tokenizer, OrtTextModel(component), component.output_shape[-1]

    def unet(self, stage: StageSpec):
        return OrtUNet(self._component(f"{stage.name}/unet"), self._json(stage.name, "unet", "config.json"), self.dtype)

    def vae_decoder(self, stage: StageSpec):
        return OrtVAEDecoder(self._component(self._entry(stage)["vae_decoder"]),
                             self._json(stage.name, "vae", "config.json"))

    def _component(self, name: str) -> OrtComponent:
        description = self.manifest["components"][name]
        return OrtComponent(self.root / description["file"], description, self.providers, self.options, self.device)

    def _entry(self, stage: StageSpec) -> dict:
        return next(e for e in self.manifest["stages"] if e["name"] == stage.name)

    def _json(self, *parts) -> dict:
        return json.loads(self.root.joinpath(*parts).read_text())
