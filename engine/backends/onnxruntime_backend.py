"""The ONNX Runtime backend: the components of an exported directory (export/onnx.py, engine/exported/).

The runtime around it (prompt handling, samplers, guidance, noise) is the torch code every backend shares;
only the text encoders, the U-Nets and the x4 upscaler's VAE decoder run as ONNX Runtime sessions (behind the
calls of exported.py). Tensors cross by pointer with IO binding
(no numpy copies): inputs are bound from torch tensors, outputs are written into preallocated torch tensors. On
CUDA each session runs on a stream ordered with torch's by stream waits (streams.py: never the default stream).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import torch

from engine.backends.exported import ExportedComponents, output_buffer, prepare_inputs
from engine.backends.streams import RunStream
from engine.errors import EngineError, InvalidRequestError, ModelError

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


def resolve_providers(providers, available: list[str] | None = None, cuda: bool | None = None) -> list[str]:
    """The providers a session asks for, in order: `providers` as given (a name or a list; each checked against
    what this ONNX Runtime offers, `available`), or by default CUDA where both ORT and torch can use a GPU
    (`cuda`: torch.cuda.is_available()), then the CPU. InvalidRequestError names a missing one and the fix."""
    if available is None:
        available = require_onnx()[1].get_available_providers()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if providers is None:
        return [p for p in DEFAULT_PROVIDERS if p in available and (p != "CUDAExecutionProvider" or cuda)]
    providers = [providers] if isinstance(providers, str) else list(providers)
    if not providers or not all(isinstance(p, str) for p in providers):
        raise InvalidRequestError(f"providers takes a provider's name or a list of them, got {providers!r}")
    missing = [p for p in providers if p not in available]
    if missing:
        fix = (" CUDA needs the [onnx-gpu] extra: pip uninstall onnxruntime && pip install 'cascade-engine[onnx-gpu]'"
               if "CUDAExecutionProvider" in missing else "")
        raise InvalidRequestError(f"ONNX Runtime providers {missing} are not available here (available: "
                                  f"{', '.join(available)}).{fix}")
    if providers[0] == "CUDAExecutionProvider" and not cuda:
        raise InvalidRequestError("CUDAExecutionProvider was asked for but PyTorch sees no CUDA GPU (the backend "
                                  "binds torch's CUDA tensors to ONNX Runtime): use providers=['CPUExecutionProvider']")
    return providers


def provider_options(providers: list[str], device: torch.device, stream: int | None = None) -> list:
    """Each provider as a session takes it: CUDA's on torch's device and on `stream`, the handle of the
    component's stream (streams.RunStream; never the default stream's 0, which ORT reads as none given), so
    ORT's kernels and torch's ops (the sampler between U-Net calls) are ordered by stream waits, no host sync."""
    chosen = []
    for provider in providers:
        if provider == "CUDAExecutionProvider" and device.type == "cuda":
            if not stream:
                raise ValueError(f"CUDAExecutionProvider needs a non-default stream's handle, got {stream!r}")
            chosen.append((provider, {"device_id": str(device.index or 0), "has_user_compute_stream": "1",
                                      "user_compute_stream": str(stream)}))
        else:
            chosen.append(provider)
    return chosen


def check_session_providers(path: Path, asked: list[str], running: list[str]) -> None:
    """ModelError where a session does not run the first provider asked for: ONNX Runtime falls back to the
    CPU when CUDA cannot start (libraries missing or mismatched), which would be silently slow."""
    if running[:1] != asked[:1]:
        raise ModelError(path, f"ONNX Runtime could not start {asked[0]} for this graph and fell back to "
                               f"{', '.join(running)}: for CUDA, the CUDA and cuDNN libraries must match the "
                               "onnxruntime-gpu build (its log above names the one missing)")


class OrtComponent:
    """One exported graph as a session; call(**named torch tensors) -> torch tensor of its first output
    (`run`: every output, in the contract's order)."""

    def __init__(self, path: Path, description: dict, providers: list[str], options, device: torch.device):
        _, ort = require_onnx()
        # On CUDA the session's stream is fixed now; each run is ordered with torch's stream then (streams.py)
        self.stream = RunStream(device, fix=True) if device.type == "cuda" else None
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=provider_options(
                providers, device, None if self.stream is None else self.stream.handle))
        except Exception as exc:  # ORT raises its own types for unreadable or invalid graphs
            raise ModelError(path, f"ONNX Runtime cannot load this graph: {exc}") from exc
        check_session_providers(path, providers, self.session.get_providers())
        self.inputs = description["inputs"]
        self.outputs = description["outputs"]
        self.device = device

    def __call__(self, **tensors: torch.Tensor) -> torch.Tensor:
        return self.run(**tensors)[0]

    def run(self, **tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        binding = self.session.io_binding()
        inputs, sizes = prepare_inputs(self.inputs, tensors, self.device)  # kept alive until the run returns
        for name, t in inputs.items():
            binding.bind_input(name, self.device.type, self.device.index or 0, _numpy_dtype(t.dtype),
                               tuple(t.shape), t.data_ptr())
        outputs = tuple(output_buffer(spec, sizes, self.device) for spec in self.outputs.values())
        for name, out in zip(self.outputs, outputs):
            binding.bind_output(name, self.device.type, self.device.index or 0, _numpy_dtype(out.dtype),
                                tuple(out.shape), out.data_ptr())
        with contextlib.nullcontext() if self.stream is None else self.stream.ordered():
            self.session.run_with_iobinding(binding)
        return outputs


def _numpy_dtype(dtype: torch.dtype):
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


class OrtComponents(ExportedComponents):
    """Components (backends/protocol.py) of an ONNX export, after verifying every file against its manifest;
    providers: ONNX Runtime execution providers (default: CUDA when usable, else CPU)."""

    kind = "onnx"
    backend = "onnxruntime"

    def __init__(self, root: Path, providers=None, threads: int | None = None):
        super().__init__(root)
        self.providers = resolve_providers(providers)
        cuda = self.providers[0] == "CUDAExecutionProvider" and torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self.options = session_options(threads, spinning=self.device.type == "cpu")  # CPU threads spin; above

    @classmethod
    def for_load(cls, root: Path, device: torch.device, providers=None) -> "OrtComponents":
        """engine.load's: the CPU provider alone where the device is the CPU, else `providers` (default CUDA
        when usable)."""
        if providers is None and device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        return cls(root, providers)

    def run_context(self):
        # On CPU the sampler's small torch ops run between ORT calls whose threads spin: torch on one thread.
        return single_threaded_torch if self.device.type == "cpu" else None

    def component(self, name: str) -> OrtComponent:
        description = self.manifest["components"][name]
        return OrtComponent(self.root / description["file"], description, self.providers, self.options, self.device)
