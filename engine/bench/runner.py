"""`python -m engine bench`: what to time for each model, in which order, and the report it makes.

A cascade (a packaged model name or model directories, as `generate` takes them, or a real-size cascade made in
memory: real_size.CASCADES) is timed through our Pipeline: one U-Net step per stage side by side with diffusers
(eager, torch.compile), then the whole request interleaved with diffusers' IF pipelines; the text encoder and
per-stage rows come from those same requests' own per-stage timings (Pipeline.run). A real-size random model
(real_size.NAMES) is timed component by component, side by side. Every row gets p50/p90/p99, images/s, peak
memory and its floor (FLOPs / the matmul peak measured in this run).

Rows are reported as they are timed (`run`'s `on_report`: the CLI rewrites its --json file after each
component), so a run stopped by a time box keeps every component it finished.
"""

from __future__ import annotations

import contextlib
import gc
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engine.backends import BACKENDS
from engine.backends.onnxruntime_backend import require_onnx
from engine.backends.torch_backend import resolve_fast, text_dtype
from engine.bench import components, real_size
from engine.bench.report import environment
from engine.bench.roofline import count_flops, floor_seconds, matmul_peak_tflops
from engine.bench.timing import interleaved, peak_memory_bytes, peak_memory_kind, percentiles_ms, timed_call
from engine.errors import EngineError, InvalidRequestError
from engine.loading import load, load_exported, resolve_device, resolve_dtype
from engine.model_dir import DEFAULT_MODEL, packaged_models, stage_dirs
from engine.options import GenerateRequest, Steps
from engine.testing.reference import reference_stages, run_reference

PROMPT = "a red circle on a blue background"


@dataclass(frozen=True)
class BenchOptions:
    """What `python -m engine bench` runs; the CLI's defaults are read from here."""

    models: tuple[str, ...] = (DEFAULT_MODEL,)  # cascade paths / packaged names, and/or real_size.NAMES
    device: str | None = None  # None: cuda if available
    dtype: str | None = None  # None: float32 on CPU, float16 on CUDA (T5 in bfloat16 there)
    batch: int = 1  # images (a guided U-Net step runs 2 x batch)
    steps: Steps | tuple[Steps, ...] | None = None  # per stage, as GenerateRequest; None: the request default
    iters: int = 10  # timed calls per variant
    warmup: int = 2  # untimed calls per variant, after the first call (timed apart: compilation, autotuning)
    whole_iters: int | None = None  # timed whole-cascade requests per variant (None: iters); warm-up min(warmup, 1)
    compare: tuple[str, ...] | None = None  # subset of components.VARIANTS; None: DEFAULT_COMPARE per device
    prompt: str = PROMPT
    threads: int | None = None  # torch's CPU threads (torch.set_num_threads); None: torch's default
    fast: bool | None = None  # "ours" on the fast path (engine/fast.py); None: the device's default (fast.resolve_fast)
    cache: object = None  # feature caching, as GenerateRequest's cache: adds a cached whole-cascade row (ours)
    compile_mode: str = "default"  # the "compile" peer's torch.compile mode (components.COMPILE_MODES)

    def __post_init__(self):
        checks = [("batch", self.batch, 1), ("iters", self.iters, 1), ("warmup", self.warmup, 0)]
        if self.threads is not None:
            checks.append(("threads", self.threads, 1))
        if self.whole_iters is not None:
            checks.append(("whole_iters", self.whole_iters, 1))
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.models:
            raise InvalidRequestError("give at least one model")
        if self.compile_mode not in components.COMPILE_MODES:
            raise InvalidRequestError(f"unknown compile mode {self.compile_mode!r}; choose from "
                                      f"{', '.join(components.COMPILE_MODES)}")
        if self.cache is not None:
            GenerateRequest(self.prompt, cache=self.cache)  # refused here, before any model loads
        if self.compare is not None:
            unknown = [v for v in self.compare if v not in components.VARIANTS]
            if unknown or not self.compare:
                raise InvalidRequestError(f"unknown --compare variant(s) {', '.join(unknown) or '(none given)'}; "
                                          f"choose from {', '.join(components.VARIANTS)}")
        for model in self.models:
            _check_model_name(model)

    @property
    def cascade(self) -> tuple[str, ...]:
        return tuple(m for m in self.models if not real_size.is_real_size_name(m))

    @property
    def real_cascades(self) -> tuple[str, ...]:
        return tuple(m for m in self.models if real_size.is_cascade_name(m))

    @property
    def real_size(self) -> tuple[str, ...]:
        return tuple(m for m in self.models if real_size.is_real_size_name(m) and not real_size.is_cascade_name(m))


def _check_model_name(model: str) -> None:
    if real_size.is_real_size_name(model) or Path(model).expanduser().exists() or model in packaged_models():
        return
    raise InvalidRequestError(
        f"unknown model {model!r}: give a packaged model ({', '.join(packaged_models())}), a model directory, "
        f"or a real-size random model ({', '.join(n for n in real_size.NAMES if n.endswith(':random'))}; "
        f"NAME:tiny for the scaled-down test version)")


@dataclass
class Row:
    """One component timed in one variant."""

    component: str
    variant: str  # components.VARIANTS
    images: int  # images (or prompts) per call
    batch: int  # the tensor batch (2 x images for a guided U-Net step)
    dtype: str
    samples_s: list[float]
    first_call_s: float | None = None  # the first call, untimed in the percentiles: compilation, autotuning
    peak_memory_bytes: int | None = None
    flops: int | None = None
    flops_source: str = ""  # "reference" (engine/configs/real_size.json's FLOPs) or "counted" (FlopCounterMode, this run)
    floor_s: float | None = None  # flops / matmul peak
    finite: bool | None = None  # the first call's output had no NaN/inf
    library: str = "diffusers"  # whose module the eager / compile variants run

    def summary(self, ours_p50_ms: float | None) -> dict:
        stats = percentiles_ms(self.samples_s)
        return {
            "component": self.component, "variant": self.variant, "label": components.LABELS[self.variant].format(library=self.library),
            "images": self.images, "batch": self.batch, "dtype": self.dtype,
            **stats, "samples_ms": [s * 1e3 for s in self.samples_s],
            "images_per_s": self.images / (stats["p50_ms"] / 1e3),
            "first_call_ms": None if self.first_call_s is None else self.first_call_s * 1e3,
            "peak_memory_mib": None if self.peak_memory_bytes is None else self.peak_memory_bytes / 2**20,
            "flops": self.flops, "flops_source": self.flops_source,
            "floor_ms": None if self.floor_s is None else self.floor_s * 1e3,
            "roofline_pct": None if self.floor_s is None else 100 * self.floor_s * 1e3 / stats["p50_ms"],
            # > 1: ours is that many times faster than this variant (p50 / ours' p50)
            "ours_speedup": None if ours_p50_ms is None else stats["p50_ms"] / ours_p50_ms,
            "finite": self.finite,
        }


@dataclass
class Session:
    """What every benchmark of one run shares: device, precision, options, and the matmul peaks measured."""

    options: BenchOptions
    device: torch.device
    dtype: torch.dtype
    compare: tuple[str, ...]
    progress: Callable[[str], None] | None = None  # one line per component timed (the CLI: stderr)
    on_rows: Callable[[], None] | None = None  # after each `add`: the report so far (run's on_report)
    peaks_tflops: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)  # every row timed so far, in the report's order

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    def add(self, rows: list[Row]) -> None:
        """Rows just timed: into the report, which is handed on at once (a time box may end the run next)."""
        self.rows += rows
        if self.on_rows is not None:
            self.on_rows()

    def peak(self, dtype: torch.dtype) -> float:
        key = str(dtype).removeprefix("torch.")
        if key not in self.peaks_tflops:
            self.say(f"measuring the {key} matmul peak")
            self.peaks_tflops[key] = matmul_peak_tflops(self.device, dtype)
        return self.peaks_tflops[key]

    def time_variants(self, component: str, calls: dict[str, Callable[[], object]], images: int, batch: int,
                      dtype: torch.dtype, flops: int | None, flops_source: str,
                      library: str = "diffusers", iters: int | None = None, warmup: int | None = None) -> list[Row]:
        """First call of each variant (timed apart), then interleaved warm-up and timing, then peak memory."""
        calls = {v: fn for v, fn in calls.items()  # the eager runtime comes with ours, as its own row
                 if v in self.compare or (v == "ours_eager" and "ours" in self.compare)}
        self.say(f"timing {component}: {', '.join(calls)}")
        first, finite = {}, {}
        for variant, fn in calls.items():
            outputs = []
            first[variant] = timed_call(lambda fn=fn, outputs=outputs: outputs.append(fn()), self.device)
            finite[variant] = _finite(outputs[0])
        samples = interleaved(calls, self.options.iters if iters is None else iters,
                              self.options.warmup if warmup is None else warmup, self.device)
        floor = floor_seconds(flops, self.peak(dtype))
        return [Row(component, variant, images, batch, str(dtype).removeprefix("torch."), samples[variant],
                    first_call_s=first[variant], peak_memory_bytes=peak_memory_bytes(fn, self.device),
                    flops=flops, flops_source=flops_source, floor_s=floor, finite=finite[variant], library=library)
                for variant, fn in calls.items()]


def _finite(out) -> bool | None:
    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out).all())
    return None


def bench_cascade(session: Session, name: str | None = None) -> None:
    """Our Pipeline on a cascade (the options' model directories, or real-size cascade `name` made in memory):
    U-Net step per stage side by side, then whole requests (text, stages, total)."""

    opts, device, dtype = session.options, session.device, session.dtype
    request = GenerateRequest([opts.prompt] * opts.batch, seed=0, steps=opts.steps, output_type="pt")
    # "ours" is the fast path where it is on (engine/fast.py): its first calls compile, reported as the first
    # call's cost, and the eager runtime gets its own row.
    if name is None:
        pipe = load(*opts.cascade, backend="torch", device=device, dtype=dtype, fast=opts.fast)
        dirs = stage_dirs(opts.cascade).dirs
        peers = None if len(dirs) not in (2, 3) else lambda: reference_stages(*dirs, dtype=dtype, device=str(device))
        ort_pipe = _onnxruntime_pipeline(session)
    else:
        session.say(f"building {name} in memory (random weights)")
        root = Path(tempfile.mkdtemp(prefix="if-cascade-"))  # configs and tokenizer only
        pipe = real_size.load_cascade(name, device, dtype, fast=opts.fast, root=root)
        peers, ort_pipe = (lambda: real_size.reference_pipes(pipe, root, dtype)), None
    settings = request.per_stage([s.defaults for s in pipe.stages])

    step_flops = {}
    received = [None] + pipe.output_sizes()  # the side of the images each stage receives
    for stage, stage_settings, previous in zip(pipe.stages, settings, received[:-1], strict=True):
        batch = 2 * opts.batch if stage_settings.guidance > 1.0 else opts.batch
        size = previous if stage.kind == "latent_upscaler" else stage.size  # x4 latents: the received size
        plain = components.fresh_copy(stage.unet.model)  # diffusers' own processors, contiguous weights
        inputs = components.unet_inputs(plain.config, batch, size, device, dtype)
        calls = components.unet_variants(plain, inputs, device, session.compare, ours=stage.unet,
                                         compile_mode=opts.compile_mode)
        if ort_pipe is not None:
            ort_unet = next(s.unet for s in ort_pipe.stages if s.name == stage.name)
            calls["onnxruntime"] = lambda u=ort_unet: u(inputs["sample"], inputs["timestep"],
                                                        inputs["encoder_hidden_states"], inputs["class_labels"])
        step_flops[stage.name] = count_flops(calls["eager"])
        session.add(session.time_variants(f"{stage.name} U-Net step ({size} px)", calls, opts.batch, batch,
                                          dtype, step_flops[stage.name], "counted"))
        if getattr(stage.unet, "cache_depths", 0) and not getattr(stage.unet, "static", False) \
                and "ours" in session.compare:
            # feature caching's shallow step (cache depth 1) on a full step's kept input: its own FLOPs. Eager
            # U-Nets only: on the fast path it would compile two more graphs per stage (minutes at real size)
            args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["class_labels"])
            kept = stage.unet.full(*args, 1)[1]
            shallow = {"ours": lambda u=stage.unet, args=args, kept=kept: u.shallow(*args, kept, 1)}
            session.add(session.time_variants(f"{stage.name} U-Net shallow step ({size} px, cache depth 1)",
                                              shallow, opts.batch, batch, dtype, count_flops(shallow["ours"]),
                                              "counted"))
        del plain, calls, inputs
        _free(device)

    timings: list[dict[str, float]] = []  # Pipeline.run's own per-stage seconds, one dict per request

    def ours():
        result = pipe.run(request)
        timings.append(result.timings)
        return result.images

    calls = {"ours": ours}
    calls.update(_diffusers_cascade(session, peers, request, settings))
    if ort_pipe is not None:
        calls["onnxruntime"] = lambda: ort_pipe.run(request).images
    text_flops = count_flops(lambda: pipe.text.encode(request.prompts))
    stage_flops = {s.name: step_flops[s.name] * st.steps
                   for s, st in zip(pipe.stages, settings, strict=True)}
    total_flops = text_flops + sum(stage_flops.values())
    steps = "+".join(str(st.steps) for st in settings)
    label = f"whole cascade ({steps} steps, {pipe.image_size} px" + ("" if name is None else f", {name}")
    whole = label + ")"
    # whole requests take seconds at real size: their own count (--whole-iters), one warm-up
    whole_iters, whole_warmup = opts.whole_iters or opts.iters, min(opts.warmup, 1)
    session.add(session.time_variants(whole, calls, opts.batch, opts.batch, dtype, total_flops, "counted",
                                      iters=whole_iters, warmup=whole_warmup))
    del calls
    _free(device)  # the peers' copies of the weights
    if "ours" not in session.compare:
        session.notes.append("text encoder and per-stage rows come from our Pipeline's requests: not run")
        return
    # The sub-rows: the timed requests only (the first call and the warm-up calls come before them in
    # `timings`; on CUDA the peak-memory call comes after).
    timed = timings[1 + whole_warmup:1 + whole_warmup + whole_iters]
    sub = [("text", "text encoder", text_flops, pipe.text.model.dtype)]
    sub += [(s.name, f"{s.name} ({st.steps} steps, {size} px)", stage_flops[s.name], dtype)
            for s, st, size in zip(pipe.stages, settings, pipe.output_sizes(), strict=True)]
    session.add([Row(label, "ours", opts.batch, opts.batch, str(sub_dtype).removeprefix("torch."),
                     [t[key] for t in timed], flops=flops, flops_source="counted",
                     floor_s=floor_seconds(flops, session.peak(sub_dtype)))
                 for key, label, flops, sub_dtype in sub])
    if opts.cache is not None:  # diffusers has no caching: ours alone, beside it
        cached = GenerateRequest(request.prompts, seed=0, steps=opts.steps, cache=opts.cache, output_type="pt")
        pipe.settings(cached)  # a cache the model cannot take is refused before any timing
        session.add(session.time_variants(
            f"{label}, cache={json.dumps(opts.cache)})", {"ours": lambda: pipe.run(cached).images}, opts.batch,
            opts.batch, dtype, count_flops(lambda: pipe.run(cached)), "counted", iters=whole_iters,
            warmup=whole_warmup))


def _onnxruntime_pipeline(session: Session):
    """Our Pipeline on ONNX Runtime where the export cache already holds this cascade in this precision and
    ONNX Runtime can run on the benchmark's device (nothing is exported here); its rows are added (variant
    "onnxruntime") and a note says where the export is. None otherwise."""
    opts, device, dtype = session.options, session.device, session.dtype
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device.type]
    try:
        _, ort = require_onnx()
    except EngineError:
        return None
    if dtype not in (torch.float32, torch.float16) or provider not in ort.get_available_providers():
        return None
    exported = BACKENDS["onnxruntime"].existing_export(opts.cascade, str(dtype).removeprefix("torch."))
    if exported is None:
        return None
    session.compare = (*session.compare, "onnxruntime")
    session.notes.append(f"ours, ONNX Runtime: the cached export at {exported} ({provider})")
    return load_exported(exported, providers=[provider])


def _diffusers_cascade(session: Session, peers: Callable[[], tuple] | None, request: GenerateRequest,
                       settings) -> dict:
    """diffusers' IF pipelines over the same weights (`peers` makes them; None: this cascade has no diffusers
    peer), eager and with compiled U-Nets (sharing the weights)."""

    wanted = [v for v in ("eager", "compile") if v in session.compare]
    if not wanted:
        return {}
    if peers is None:
        session.notes.append("whole cascade: diffusers compared only for IF cascades of two stages and an "
                             "optional x4 upscaler")
        return {}
    pipes = peers()
    args = dict(prompts=request.prompts, seed=request.seed, steps=[s.timesteps for s in settings],
                guidance=[s.guidance for s in settings], noise_level=tuple(s.noise_level for s in settings[1:]),
                output_type="pt")
    calls = {"eager": lambda: run_reference(pipes, **args)}
    if "compile" in wanted:
        compiled_unets = [components.compiled(p.unet, session.options.compile_mode) for p in pipes]

        def run_compiled():
            with _swapped_unets(pipes, compiled_unets):
                return run_reference(pipes, **args)
        calls["compile"] = run_compiled
    return {v: calls[v] for v in wanted}


@contextlib.contextmanager
def _swapped_unets(pipes, unets):
    saved = [p.unet for p in pipes]
    for p, u in zip(pipes, unets, strict=True):
        p.unet = u
    try:
        yield
    finally:
        for p, u in zip(pipes, saved, strict=True):
            p.unet = u


def bench_real_size(session: Session, name: str) -> None:
    """Each part of a real-size random model, side by side; "ours" where the engine has its own wrapper: a
    U-Net's is the fast path where it is on (BenchOptions.fast), as a loaded pipeline runs it."""

    tiny = real_size.split_name(name)[1] == "tiny"
    fast = resolve_fast(session.options.fast, session.device)
    for part in real_size.parts(name):
        session.say(f"building {name} {part.name} (random weights)")
        dtype = text_dtype(session.dtype) if part.kind == "t5" else session.dtype  # T5 never in float16
        config = real_size.part_config(part, tiny)
        model = real_size.build(part, session.device, dtype, tiny=tiny)
        size = real_size.input_size(part, config, tiny)
        # the compiled packages' key: what makes the weights (the architecture, random_init_ and its seed)
        weights_key = f"{name}/{part.config_key}, real_size.random_init_ seed 0"
        calls, batch = components.part_calls(part, model, config, session.options.batch, size, session.device,
                                             dtype, session.compare, session.options.compile_mode, fast,
                                             weights_key)
        flops = real_size.reference_flops(part, tiny)
        if flops is not None:
            flops, source = flops * batch, "reference"
        else:
            flops, source = count_flops(calls["eager"]), "counted"
        if "ours" in session.compare and "ours" not in calls:
            session.notes.append(f"{part.name}: no 'ours' row: the engine runs this module unchanged")
        label = part.name if size is None else f"{part.name} ({size} {part.unit})"
        library = "transformers" if part.kind in ("t5", "clip") else "diffusers"
        session.add(session.time_variants(f"{name} {label}", calls, session.options.batch, batch, dtype, flops,
                                          source, library))
        del model, calls
        _free(session.device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(options: BenchOptions, command: str = "", progress: Callable[[str], None] | None = None,
        on_report: Callable[[dict], None] | None = None) -> dict:
    """Run every benchmark `options` asks for; the report (also what --json writes). on_report: given the
    report so far after each component timed (its "complete" false), so that a stopped run keeps its rows."""

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if options.cascade or options.real_cascades:
        GenerateRequest(options.prompt, steps=options.steps)  # bad steps fail before any model work
    session = Session(options, device, dtype, options.compare or components.DEFAULT_COMPARE[device.type],
                      progress)

    def report(complete: bool) -> dict:
        ours_p50 = {r.component: percentiles_ms(r.samples_s)["p50_ms"] for r in session.rows if r.variant == "ours"}
        return {
            "benchmark": "python -m engine bench", "command": command, "date": time.strftime("%Y-%m-%d"),
            **environment(device),
            "options": {**asdict(options), "compare": list(session.compare),
                        "dtype": str(dtype).removeprefix("torch."), "fast": resolve_fast(options.fast, device)},
            "matmul_peak_tflops": session.peaks_tflops,
            "peak_memory": peak_memory_kind(device),
            "timer": "CUDA events (after a synchronize)" if device.type == "cuda" else "time.perf_counter",
            "complete": complete,
            "rows": [r.summary(ours_p50.get(r.component)) for r in session.rows],
            "notes": session.notes,
        }

    if on_report is not None:
        session.on_rows = lambda: on_report(report(complete=False))
    with torch.inference_mode():
        session.peak(dtype)  # first, on an idle device
        if options.cascade:
            bench_cascade(session)
        for name in options.real_cascades:
            bench_cascade(session, name)
        for name in options.real_size:
            bench_real_size(session, name)
    return report(complete=True)
