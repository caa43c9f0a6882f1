"""The fast path: a stage's denoising loop over static buffers, one step function serving every step.

`FastUNet` is a TorchUNet made for it: channels_last, its text-only work taken out of the steps
(text_constants.py), and compiled (compiled.py), one static shape per graph.

`StepRunner` holds, for one shape of run (images B, sample shape, sampler kind, config and step count, with
or without guidance), every tensor a step touches, allocated once:
    x            (B, C, H, W) float32, the sample
    model_in     (rows, C_in, H, W) the U-Net input; rows = 2B under guidance, [uncond; cond]; the low-res
                 channels of a super-resolution stage are written once per run, x is copied into both halves
    embeddings   (rows, 77, D), class_labels (rows,), and the U-Net's text constants for those rows
    noise        (N, B, C, H, W) every step's noise, drawn at the start as the eager loop draws it (zeros where
                 a step takes none: mean + std * 0 is the mean exactly)
    index        (1,) int64, the step counter, on the device; the sampler's tables are indexed with it
                 (samplers.at) and the step increments it, so one step function serves every step
    guidance     (1,) float32, the guidance scale
A run's values are copied in (`load`), so one runner serves every run of its shape. An unguided step (under
a guidance interval) uses the last B rows, the cond half, of the same buffers.

On CUDA each step kind (guided or not) is captured once in a CUDA graph and replayed N times: no host sync and
no allocation between steps. All graphs share one memory pool: their temporaries are dead when a replay ends
(every result lands in the runner's buffers), and the stages run one after another. On CPU the same step
function runs as it is, around the compiled U-Net.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict

import torch
from tqdm.auto import tqdm

from engine.compiled import CompiledCall
from engine.exported.manifest import source_hash
from engine.samplers import at
from engine.text_constants import TextConstants

# Row counts of the scheduler's U-Net calls (engine.serve): 2 x DEFAULT_MAX_BATCH images under guidance at most.
ROW_BUCKETS = (1, 2, 4, 8, 16)
MAX_RUNNERS = 8  # run shapes kept per stage; the least recently used goes first
WARMUP_STEPS = 2  # steps run on a side stream before a capture (lazy initialisation, cuDNN's algorithm search)
_POOLS: dict[torch.device, object] = {}  # one CUDA graph memory pool per device


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
    `values`, the request's text constants for the call's rows (None: computed in the call)."""

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

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None, values=None):
        rows = sample.shape[0]
        if values is None:  # the scheduler's calls: padded up to a bucket, one compiled graph each
            padded = bucket(rows)
            if padded != rows:
                sample, timestep, encoder_hidden_states, class_labels = (
                    None if t is None else _pad_rows(t, padded)
                    for t in (sample, timestep, encoder_hidden_states, class_labels))
        sample = sample.contiguous(memory_format=torch.channels_last)
        args = (sample, timestep, encoder_hidden_states, class_labels, values)
        if not self.compile:
            return self._call(*args)[:rows]
        shape = (tuple(sample.shape), tuple(timestep.shape), values is not None)
        if shape not in self._compiled:
            self._compiled[shape] = CompiledCall(self._call, args, self.device, lambda: self.source)
        return self._compiled[shape](*args)[:rows]


    @functools.cached_property
    def source(self) -> str:
        """The hash of its directory's files, read once (not once per compiled shape)."""
        return source_hash([self.directory])


def bucket(rows: int) -> int:
    """The row count a scheduler call of `rows` rows runs at: the next power of two up to ROW_BUCKETS' last,
    past it the rows themselves (each such count compiles its own graph)."""
    return next((b for b in ROW_BUCKETS if b >= rows), rows)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with its last row repeated up to `rows` rows (U-Net rows are independent: the padding is dropped)."""
    return torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])])


class StepRunner:
    """One shape of run's loop over static buffers (module docstring)."""

    def __init__(self, stage, run):
        self.stage, self.unet = stage, stage.unet
        self.sampler = run.sampler  # this runner's own from now on: later runs' tables are copied into it
        batch, device = run.x.shape[0], stage.device
        self.batch, self.steps = batch, run.steps
        rows = 2 * batch if run.pair is not None else batch
        height, width = run.x.shape[2:]
        self.x = torch.empty_like(run.x)
        # channels_last, as FastUNet takes it: no copy per step (a slice of rows stays channels_last)
        self.model_in = torch.zeros((rows, self.unet.in_channels, height, width), dtype=stage.dtype,
                                    device=device).contiguous(memory_format=torch.channels_last)
        self.embeddings = torch.empty((rows, *run.cond.shape[1:]), dtype=run.cond.dtype, device=device)
        self.class_labels = None if run.class_labels is None else torch.empty(rows, dtype=torch.int64, device=device)
        self.noise = torch.zeros((run.steps, *run.x.shape), device=device)
        self.index = torch.zeros(1, dtype=torch.int64, device=device)
        self.guidance = torch.zeros(1, device=device)
        self.values: dict[str, torch.Tensor] | None = None  # the U-Net's text constants, made by the first load
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}

    @staticmethod
    def key(run) -> tuple:
        """What a runner is made for: runs with the same key share one."""
        return (tuple(run.x.shape), run.low_res is not None, run.pair is not None, tuple(run.cond.shape[1:]),
                type(run.sampler).__name__, json.dumps(run.sampler.config, sort_keys=True, default=str), run.steps)

    @staticmethod
    def _rows_of(run) -> torch.Tensor:
        return run.pair if run.pair is not None else run.cond  # (rows, 77, D)

    @torch.inference_mode()
    def load(self, run) -> None:
        """Copy a run's values into the buffers: its sample, conditioning, noise, sampler tables, guidance."""
        self.x.copy_(run.x)
        channels = run.x.shape[1]
        if run.low_res is not None:  # the same low-res channels for both halves, written once per run
            self.model_in[:, channels:].unflatten(0, (-1, self.batch)).copy_(run.low_res)
        embeddings = self._rows_of(run)
        self.embeddings.copy_(embeddings)
        if self.class_labels is not None:
            self.class_labels.copy_(run.class_labels[run.pair is not None])
        for step, noise in enumerate(run.noise):
            if noise is None:
                self.noise[step].zero_()
            else:
                self.noise[step].copy_(noise)
        if run.sampler is not self.sampler:
            self.sampler.load(run.sampler)
        values = self.unet.constants.constants(embeddings)
        if self.values is None:
            self.values = values  # fresh tensors, this runner's from now on
        else:
            for name, value in values.items():
                self.values[name].copy_(value)
        self.index.zero_()
        self.guidance.fill_(run.settings.guidance)

    def step(self, guided: bool) -> None:
        """One step: input assembly, U-Net, guidance, sampler update; everything read and written is a buffer."""
        rows = self.model_in.shape[0] if guided else self.batch
        model_in = self.model_in[-rows:]
        channels = self.x.shape[1]
        model_in[:, :channels].unflatten(0, (-1, self.batch)).copy_(self.x.to(model_in.dtype))
        timestep = at(self.sampler.timesteps, self.index).expand(rows)
        labels = None if self.class_labels is None else self.class_labels[-rows:]
        out = self.unet(model_in, timestep, self.embeddings[-rows:], labels, self.values).float()
        eps, variance = self.stage._guide(out, self.guidance if guided else None)
        noise = self.noise.index_select(0, self.index)[0]  # (B, C, H, W)
        self.x.copy_(self.sampler.step(self.index, eps, variance, self.x, noise))
        self.index.add_(1)

    @torch.inference_mode()
    def denoise(self, run, progress: bool = False, on_step=None) -> None:
        """Step a loaded run to its end; its x becomes the result (a copy: the buffers serve the next run)."""
        captured = self.stage.device.type == "cuda"
        for step in tqdm(range(self.steps), desc=self.stage.name, disable=not progress, leave=False):
            guided = run.guided_steps[step]
            if captured:
                self._graph(guided).replay()
            else:
                self.step(guided)
            if on_step is not None:
                on_step(self.stage.name, step + 1, self.steps)
        run.x = self.x.clone()
        run.step = self.steps

    def _state(self) -> list[torch.Tensor]:
        """Everything a step writes (the sampler's tables too: DPM-Solver keeps its previous x0 there)."""
        return [self.x, self.index] + [v for v in vars(self.sampler).values() if isinstance(v, torch.Tensor)]

    def _graph(self, guided: bool):
        """The CUDA graph of one step kind, captured on first use; the run's state is kept across the warm-up."""
        if guided not in self.graphs:
            state = self._state()
            saved = [t.clone() for t in state]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.index.zero_()  # in range whatever the step count
                    self.step(guided)
            torch.cuda.current_stream().wait_stream(side)
            for tensor, value in zip(state, saved):
                tensor.copy_(value)
            graph = torch.cuda.CUDAGraph()
            device = self.stage.device
            pool = _POOLS.setdefault(device, torch.cuda.graph_pool_handle())
            with torch.cuda.graph(graph, pool=pool):
                self.step(guided)
            self.graphs[guided] = graph
        return self.graphs[guided]


class FastPath:
    """A stage's fast path: its runners, one per shape of run, the least recently used dropped past
    MAX_RUNNERS."""

    def __init__(self, stage):
        self.stage = stage
        self.runners: OrderedDict[tuple, StepRunner] = OrderedDict()

    def denoise(self, run, progress: bool = False, on_step=None) -> None:
        key = StepRunner.key(run)
        runner = self.runners.pop(key, None) or StepRunner(self.stage, run)
        self.runners[key] = runner
        while len(self.runners) > MAX_RUNNERS:
            self.runners.popitem(last=False)
        runner.load(run)
        runner.denoise(run, progress, on_step)
