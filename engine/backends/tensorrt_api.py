"""One face for both TensorRT flavours: NVIDIA's data-center `tensorrt` where it is installed, else TensorRT for
RTX (`tensorrt_rtx_bindings`, installed by the [tensorrt] extra). The builder (export/tensorrt.py) and the
backend (tensorrt_backend.py) see only `TensorRT`; where the two flavours differ, it is handled here:

- targets: RTX builds ahead of time for listed compute capabilities, on a machine with or without a GPU; the
  data-center flavour builds for the GPU it runs on ("current") only.
- precision: networks are created strongly typed (RTX always is; the data-center flavour is asked to be), so a
  float16 export builds as float16 and no precision flag exists on either.
- caches: RTX keeps a runtime cache of the kernels it compiles when an engine first runs (its timing cache is a
  no-op); the data-center flavour keeps a timing cache of its build.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from engine.errors import EngineError

FLAVOURS = {"datacenter": "tensorrt", "rtx": "tensorrt_rtx_bindings"}  # flavour -> import name, preferred first
CURRENT = "current"  # the target "the GPU this machine has"
INSTALL = "pip install 'cascade-engine[tensorrt]'"


def require_tensorrt(flavour: str | None = None) -> TensorRT:
    """The installed TensorRT (data-center preferred), or `flavour`'s; EngineError naming the extra otherwise."""
    names = FLAVOURS if flavour is None else {flavour: FLAVOURS[flavour]}
    for name, module in names.items():
        try:
            return TensorRT(importlib.import_module(module), name)
        except ImportError:
            continue
    wanted = "TensorRT" if flavour is None else f"TensorRT ({flavour} flavour, import {FLAVOURS[flavour]})"
    raise EngineError(f"the tensorrt backend and `--format tensorrt` need {wanted}, which is not installed: "
                      f"{INSTALL} (TensorRT for RTX; NVIDIA's data-center TensorRT is used instead when installed)")


class CapturingLogger:
    """A TensorRT logger that keeps every message (the detailed build log lists the fused layers) and passes
    errors on to `errors` so a failed build can say why."""

    def __init__(self, trt):
        self._base = trt.ILogger
        self._base.__init__(self)
        self.messages: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self._error_level = int(trt.ILogger.Severity.ERROR)

    def log(self, severity, message):
        self.messages.append((int(severity), message))
        if int(severity) <= self._error_level:
            self.errors.append(message)


@dataclass(frozen=True)
class TensorRT:
    module: object  # tensorrt or tensorrt_rtx_bindings
    flavour: str  # "datacenter" or "rtx"

    @property
    def version(self) -> str:
        return self.module.__version__

    def logger(self) -> CapturingLogger:
        cls = type("Logger", (CapturingLogger, self.module.ILogger), {})
        return cls(self.module)

    def offered_targets(self) -> tuple[str, ...]:
        """Compute capabilities this flavour builds for ahead of time, as "sm80"; "current" always."""
        if self.flavour != "rtx":
            return (CURRENT,)
        names = [n for n in dir(self.module.ComputeCapability) if re.fullmatch(r"SM\d+", n)]
        return tuple(sorted((n.lower() for n in names), key=lambda n: int(n[2:]))) + (CURRENT,)

    def check_targets(self, targets: tuple[str, ...]) -> tuple[str, ...]:
        offered = self.offered_targets()
        targets = tuple(t.lower() for t in targets)
        unknown = [t for t in targets if t not in offered]
        if unknown or not targets:
            raise EngineError(f"TensorRT ({self.flavour} {self.version}) cannot build for {', '.join(unknown) or 'no target'}; "
                              f"it offers {', '.join(offered)}")
        if CURRENT in targets and len(targets) > 1:
            raise EngineError("the target 'current' (this machine's GPU) cannot be combined with others")
        return targets

    def network(self, builder):
        """A strongly typed network: each layer runs in its inputs' precision (float16 exports build as float16)."""
        flags = self.module.NetworkDefinitionCreationFlag
        return builder.create_network(0 if self.flavour == "rtx" else 1 << int(flags.STRONGLY_TYPED))

    def set_targets(self, config, targets: tuple[str, ...]) -> None:
        if self.flavour != "rtx":  # checked: only "current"
            return
        config.num_compute_capabilities = len(targets)
        for i, target in enumerate(targets):
            config.set_compute_capability(getattr(self.module.ComputeCapability, target.upper()), i)

    def attach_timing_cache(self, config, data: bytes | None):
        """The data-center builder's timing cache (tactic timings of earlier builds); None on RTX (a no-op there)."""
        if self.flavour == "rtx":
            return None
        cache = config.create_timing_cache(data or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        return cache

    def execution_context(self, engine, runtime_cache: bytes | None):
        """(context, runtime cache or None): RTX gets CUDA-graph capture and its runtime cache (kernels it
        compiles at first run, kept between processes); the data-center flavour gets a plain context."""
        if self.flavour != "rtx":
            return engine.create_execution_context(), None
        config = engine.create_runtime_config()
        config.cuda_graph_strategy = self.module.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        cache = config.create_runtime_cache()
        if runtime_cache:
            cache.deserialize(runtime_cache)
        config.set_runtime_cache(cache)
        return engine.create_execution_context(config), cache
