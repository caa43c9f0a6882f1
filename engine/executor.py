"""The step executor: one denoising step for a set of a stage's runs, the one place a step is written.

A step is input assembly (each run's sample, twice under guidance, beside a super-resolution stage's low-res
image), one U-Net call over every run's rows (each row at its own timestep), then for each run guidance and
its sampler update (`update`). The split is vLLM's: a caller decides which runs take the next step, the
executor runs it. `Pipeline.run` is the executor with one run at a time (`denoise`); the step-level scheduler
(engine/serve, and through it `engine.batch`) hands it every step of every request (`forward`, then each
run's `StageRun.advance`).

Eager or static, as the U-Net asks (backends/protocol.py): a U-Net with `static = True` (the torch backend's
fast path, backends/fast_unet.py) is compiled per shape, so it is called on buffers allocated once per shape,
and on CUDA its calls are captured in CUDA graphs and replayed:

- `RowBuffers`, the scheduler's, one set per row bucket (rows padded up to ROW_BUCKETS, sample shape and
  conditioning shape): sample (rows, C_in, H, W) channels_last, timestep (rows,), embeddings (rows, 77, D),
  class labels (rows,), the U-Net's text constants for those rows, and the output (rows, C_out, H, W). The
  conditioning rows and their text constants are written only when the batch's members (or their step kind)
  change; sample and timestep rows at every step. Padding rows keep whatever they held (U-Net rows are
  independent; their outputs are dropped). On CUDA one graph per bucket replays the U-Net call. Under feature
  caching each step kind (StageRun.kind_at: plain, or full or shallow at a depth) has its own buffers, with
  `kept` (rows, C, h, w): a full call writes what it keeps there (each run takes a copy of its rows), a shallow
  call reads each run's copy from there.
- `StepRunner`, a single run's: for one shape of run (images B, sample shape, sampler kind, config and step
  count, with or without guidance), every tensor a step touches, so that the whole step (assembly, U-Net,
  guidance, sampler update) is one function of buffers, captured once per step kind (guided or not) on CUDA:
      x            (B, C, H, W) float32, the sample
      model_in     (rows, C_in, H, W) the U-Net input; rows = 2B under guidance, [uncond; cond]; the low-res
                   channels of a super-resolution stage are written once per run, x into both halves per step
      embeddings   (rows, 77, D), class_labels (rows,), and the U-Net's text constants for those rows
      noise        (N, B, C, H, W) every step's noise, drawn at the start as the eager loop draws it (zeros
                   where a step takes none: mean + std * 0 is the mean exactly)
      index        (1,) int64, the step counter, on the device; the sampler's tables are indexed with it
                   (samplers.at) and the step increments it, so one step function serves every step
      guidance     (1,) float32, the guidance scale
      kept         (rows, C, h, w) under feature caching: what the last full step kept (an unguided step's are
                   its last B rows); a step's kind (guided or not; plain, full or shallow) is read from the
                   run's host-side plan, one captured graph per kind
  A run's values are copied in (`load`), so one runner serves every run of its shape. An unguided step (under
  a guidance interval) uses the last B rows, the cond half, of the same buffers.

What the executor relies on of a sampler (samplers.py's contract): its per-run state lives in its tensor
attributes, so `load` copies one run's sampler into a runner's and a captured step reads and writes it there.

All CUDA graphs share one memory pool per device: their temporaries are dead when a replay ends (every result
lands in a buffer), and the stages run one after another.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
from tqdm.auto import tqdm

from engine.samplers import at

# Row counts of the scheduler's U-Net calls: 2 x DEFAULT_MAX_BATCH images under guidance at most, past it the
# rows themselves.
ROW_BUCKETS = (1, 2, 4, 8, 16)
MAX_RUNNERS = 8  # StepRunners kept per stage; the least recently used goes first
WARMUP_STEPS = 2  # calls run on a side stream before a capture (lazy initialisation, cuDNN's algorithm search)
_POOLS: dict[torch.device, object] = {}  # one CUDA graph memory pool per device


def progress_bar(first: int, steps: int, name: str, progress: bool | dict):
    """range(first, steps) behind a tqdm bar named for the stage: progress is whether to show it, or tqdm's
    options."""
    options = {"desc": name, "leave": False, "disable": not progress}
    if isinstance(progress, dict):
        options.update({"disable": False, **progress})
    return tqdm(range(first, steps), **options)


def bucket(rows: int) -> int:
    """The row count a U-Net call of `rows` rows runs at on static buffers: the next of ROW_BUCKETS, past
    the last the rows themselves (each such count makes its own buffers and graph)."""
    return next((b for b in ROW_BUCKETS if b >= rows), rows)


def write_sample(dest: torch.Tensor, x: torch.Tensor, low_res: torch.Tensor | None) -> None:
    """A run's U-Net input into `dest` (rows, C_in, H, W), rows = B or 2B: x (B, C, H, W) into the first C
    channels of each group of B rows ([uncond; cond] see the same sample), cast to dest's dtype, and a
    super-resolution stage's low_res (B, 3, H, W) into the rest, where given."""
    groups = dest.unflatten(0, (-1, x.shape[0]))  # (1 or 2, B, C_in, H, W), a view
    channels = x.shape[1]
    groups[:, :, :channels].copy_(x.expand(groups.shape[0], *x.shape))
    if low_res is not None:
        groups[:, :, channels:].copy_(low_res.expand(groups.shape[0], *low_res.shape))


def update(stage, sampler, index, out: torch.Tensor, guidance, x: torch.Tensor, noise) -> torch.Tensor:
    """The next sample (B, C, H, W) float32 of one run from its U-Net output (rows, C_out, H, W) float32:
    guidance (None: an unguided step; a float or a (1,) tensor), then the sampler step `index` (an int, or the
    device-side counter)."""
    eps, variance = stage._guide(out, guidance)
    return sampler.step(index, eps, variance, x, noise)


def keep_masked(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """An inpainting step's result: `after` where the mask (B, 1, h, w) redraws, `before` where it keeps, as
    diffusers' `(1 - mask) * prev + mask * new` with keep = 1 - mask made once per run (exact for a 0/1 mask
    and finite values)."""
    return keep * before + mask * after


def _capture(device: torch.device, call, warm=None, private: bool = False) -> torch.cuda.CUDAGraph:
    """`call()` captured in a CUDA graph, after WARMUP_STEPS calls of `warm` (default: `call`) on a side
    stream (the caller restores any state those calls changed). private: in a memory pool of its own, which
    goes with the graph (a graph made only to be timed), not the device's shared one."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            (warm or call)()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle() if private else _POOLS.setdefault(device, torch.cuda.graph_pool_handle())
    with torch.cuda.graph(graph, pool=pool):
        call()
    return graph


class StageExecutor:
    """A stage's steps (module docstring): eager, or on static buffers where its U-Net is static."""

    def __init__(self, stage):
        self.stage = stage
        self.runners: OrderedDict[tuple, StepRunner] = OrderedDict()  # single runs, per shape of run
        self.buffers: dict[tuple, RowBuffers] = {}  # the scheduler's, per row bucket and shapes
        self._eager_rows: tuple | None = None  # (members, embeddings, labels) of the last eager batch

    @property
    def unet(self):
        return self.stage.unet

    @property
    def static(self) -> bool:
        """Whether its steps run on static buffers: the U-Net's own say (backends/protocol.py)."""
        return bool(getattr(self.unet, "static", False))

    # -- one run to its end (Pipeline.run) ----------------------------------------------------------------

    @torch.inference_mode()
    def denoise(self, run, progress: bool | dict = False, on_step=None) -> None:
        """Step `run` to its end: on a StepRunner where the U-Net is static, else one eager step at a time.
        on_step(stage name, step, total) is called after each step is queued; it reads no tensor."""
        name = self.stage.name
        if self.static:
            runner = self._runner(run)
            runner.load(run)
            runner.denoise(run, progress, on_step)
            return
        for step in progress_bar(run.step, run.steps, name, progress):
            (out,) = self.forward([run])
            run.advance(out)
            if on_step is not None:
                on_step(name, step + 1, run.steps)

    def _runner(self, run) -> "StepRunner":
        key = StepRunner.key(run)
        runner = self.runners.pop(key, None) or StepRunner(self.stage, run)
        self.runners[key] = runner
        while len(self.runners) > MAX_RUNNERS:
            self.runners.popitem(last=False)
        return runner

    # -- one step of several runs (the scheduler) ---------------------------------------------------------

    @torch.inference_mode()
    def forward(self, runs: list) -> list[torch.Tensor]:
        """One U-Net call over the next step of every run in `runs` (same sample shape; each at its own
        step, guided or not); returns each run's output rows (rows, C_out, H, W) float32, for its
        `StageRun.advance`. On static buffers the outputs are views of them, valid until the next call."""
        kinds = {run.step_kind for run in runs}
        if len(kinds) > 1:  # feature caching: one call per step kind (plain, full or shallow) and depth
            outputs = {}
            for kind in sorted(kinds):
                group = [run for run in runs if run.step_kind == kind]
                outputs.update(zip(map(id, group), self.forward(group)))
            return [outputs[id(run)] for run in runs]
        rows = [run.rows for run in runs]
        members = tuple((run.serial, run.guided) for run in runs)  # what the conditioning rows depend on
        if self.static:
            out = self._static_call(runs, members, sum(rows))
        else:
            out = self._eager_call(runs, members, sum(rows))
        return list(out.float().split(rows))

    def _eager_call(self, runs: list, members: tuple, total: int) -> torch.Tensor:
        first, stage = runs[0], self.stage
        channels = first.x.shape[1] + (0 if first.low_res is None else first.low_res.shape[1])  # C_in
        sample = torch.empty((total, channels, *first.x.shape[2:]), dtype=stage.dtype, device=stage.device)
        row = 0
        for run in runs:
            write_sample(sample[row:row + run.rows], run.x, run.low_res)
            row += run.rows
        timestep = torch.cat([run.timestep.expand(run.rows) for run in runs])  # (rows,)
        if len(runs) == 1:
            embeddings, labels = first.conditioning()
        else:  # constant while the members and their step kinds stay the same: concatenated when they change
            if self._eager_rows is None or self._eager_rows[0] != members:
                parts = [run.conditioning() for run in runs]
                labels = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
                self._eager_rows = (members, torch.cat([p[0] for p in parts]), labels)
            _, embeddings, labels = self._eager_rows
        kind, depth = first.step_kind  # every run's here (forward groups them)
        if kind == "unet":
            return self.unet(sample, timestep, embeddings, labels)
        if kind == "shallow":  # their kept rows, in order
            kept = torch.cat([run.kept for run in runs]) if len(runs) > 1 else first.kept
            return self.unet.shallow(sample, timestep, embeddings, labels, kept, depth)
        out, kept = self.unet.full(sample, timestep, embeddings, labels, depth)
        for run, part in zip(runs, kept.split([run.rows for run in runs])):
            run.kept = part
        return out

    def _static_call(self, runs: list, members: tuple, total: int) -> torch.Tensor:
        first = runs[0]
        embeddings, labels = first.conditioning()
        buffers = self._buffers(total, tuple(first.x.shape[1:]), embeddings, labels, first.step_kind)
        buffers.write(runs, members)
        buffers.call()
        if buffers.kind[0] == "full":  # each run keeps a copy of its rows (the buffers serve the next call)
            row = 0
            for run in runs:
                part = buffers.kept[row:row + run.rows]
                if run.kept is not None and run.kept.shape == part.shape:
                    run.kept.copy_(part)  # into the run's own copy: no allocation per full step
                else:
                    run.kept = part.clone()
                row += run.rows
        return buffers.out[:total]

    @torch.inference_mode()
    def warmup(self, rows: int, embeddings: torch.Tensor, kind: tuple[str, int] = ("unet", 0)) -> None:
        """Make (compile, and on CUDA capture) the static buffers of the bucket a `rows`-row call of step kind
        `kind` (StageRun.kind_at) runs at, for conditioning rows like `embeddings` (1, 77, D); nothing to make
        for an eager U-Net."""
        if not self.static:
            return
        stage = self.stage
        labels = None if stage.noising is None else torch.zeros(1, dtype=torch.int64, device=stage.device)
        buffers = self._buffers(rows, (stage.sample_channels, stage.size, stage.size), embeddings, labels, kind)
        buffers.set_conditioning([embeddings.expand(buffers.rows, -1, -1)],
                                 None if labels is None else [labels.expand(buffers.rows)])
        buffers.call()

    def _buffers(self, rows: int, sample_shape: tuple, embeddings: torch.Tensor, labels: torch.Tensor | None,
                 kind: tuple[str, int]) -> "RowBuffers":
        """The row buffers a `rows`-row call runs on (its bucket's), made on first use: keyed by the bucket, the
        sample shape (C, H, W), the conditioning rows' shape and dtype, and the step kind."""
        key = (bucket(rows), sample_shape, tuple(embeddings.shape[1:]), embeddings.dtype, labels is not None, kind)
        if key not in self.buffers:
            self.buffers[key] = RowBuffers(self.stage, key[0], sample_shape, embeddings, labels, kind)
        return self.buffers[key]


def call_unet(unet, kind: tuple[str, int], args: tuple, values, kept: torch.Tensor | None) -> torch.Tensor:
    """A static U-Net's call of one step kind (StageRun.kind_at) on (sample, timestep, embeddings, labels): the
    plain call; under feature caching the full call, which writes what it keeps into `kept`, or the shallow
    call on `kept`."""
    name, depth = kind
    if name == "full":
        out, new = unet.full(*args, depth, values)
        kept.copy_(new)
        return out
    if name == "shallow":
        return unet.shallow(*args, kept, depth, values)
    return unet(*args, values)


def kept_buffer(stage, rows: int, sample: torch.Tensor, depth: int) -> torch.Tensor:
    """Zeros for what a full call at `depth` keeps for `rows` rows shaped like `sample` (any rows, C_in, H, W):
    (rows, C, h, w), channels_last as the static U-Net makes it."""
    shape = stage.unet.kept_shape(rows, *sample.shape[2:], depth)
    return torch.zeros(shape, dtype=stage.dtype, device=stage.device).contiguous(memory_format=torch.channels_last)


class RowBuffers:
    """The scheduler's static buffers for one row bucket (module docstring)."""

    def __init__(self, stage, rows: int, sample_shape, embeddings: torch.Tensor, labels: torch.Tensor | None,
                 kind: tuple[str, int] = ("unet", 0)):
        self.stage, self.unet, self.rows, self.kind = stage, stage.unet, rows, kind
        device = stage.device
        self.sample = torch.zeros((rows, self.unet.in_channels, *sample_shape[1:]), dtype=stage.dtype,
                                  device=device).contiguous(memory_format=torch.channels_last)
        self.timestep = torch.zeros(rows, dtype=torch.int64, device=device)
        self.embeddings = torch.zeros((rows, *embeddings.shape[1:]), dtype=embeddings.dtype, device=device)
        self.class_labels = None if labels is None else torch.zeros(rows, dtype=torch.int64, device=device)
        self.values = self.unet.text_constants(self.embeddings)  # fresh tensors, these buffers' from now on
        self.out = torch.zeros((rows, self.unet.out_channels, *sample_shape[1:]), dtype=stage.dtype, device=device)
        # Feature caching: what the full call keeps, the shallow call's input (rows, C, h, w)
        self.kept = None if kind[0] == "unet" else kept_buffer(stage, rows, self.sample, kind[1])
        self.members: tuple | None = None  # whose conditioning rows the buffers hold
        self.graph: torch.cuda.CUDAGraph | None = None

    def write(self, runs: list, members: tuple) -> None:
        """The runs' samples and timesteps into their rows (and a shallow call's kept rows); their conditioning
        rows when the members changed."""
        row = 0
        for run in runs:
            write_sample(self.sample[row:row + run.rows], run.x, run.low_res)
            self.timestep[row:row + run.rows].copy_(run.timestep)  # a (0-d) device tensor: no host sync
            if self.kind[0] == "shallow":
                self.kept[row:row + run.rows].copy_(run.kept)
            row += run.rows
        if members != self.members:
            parts = [run.conditioning() for run in runs]
            self.set_conditioning([p[0] for p in parts], None if parts[0][1] is None else [p[1] for p in parts])
            self.members = members

    def set_conditioning(self, embeddings: list[torch.Tensor], labels: list[torch.Tensor] | None) -> None:
        """Conditioning rows from the top (rows past them keep what they held) and the text constants of all."""
        row = 0
        for part in embeddings:
            self.embeddings[row:row + part.shape[0]].copy_(part)
            row += part.shape[0]
        row = 0
        for part in labels or ():
            self.class_labels[row:row + part.shape[0]].copy_(part)
            row += part.shape[0]
        values = self.unet.text_constants(self.embeddings)
        for name, value in (values or {}).items():
            self.values[name].copy_(value)
        self.members = None

    def _forward(self) -> None:
        args = (self.sample, self.timestep, self.embeddings, self.class_labels)
        self.out.copy_(call_unet(self.unet, self.kind, args, self.values, self.kept))

    def call(self) -> None:
        """The U-Net over the buffers into `out`: a graph replay on CUDA (captured at the first call)."""
        device = self.stage.device
        if device.type != "cuda":
            self._forward()
            return
        if self.graph is None:
            self.graph = _capture(device, self._forward)
        self.graph.replay()


class StepRunner:
    """One shape of single run's loop over static buffers (module docstring)."""

    def __init__(self, stage, run):
        self.stage, self.unet = stage, stage.unet
        self.sampler = run.sampler  # this runner's own from now on: later runs' tables are copied into it
        batch, device = run.x.shape[0], stage.device
        self.batch, self.steps = batch, run.steps
        rows = 2 * batch if run.pair is not None else batch
        height, width = run.x.shape[2:]
        self.x = torch.empty_like(run.x)
        # channels_last, as a static U-Net takes it: no copy per step (a slice of rows stays channels_last)
        self.model_in = torch.zeros((rows, self.unet.in_channels, height, width), dtype=stage.dtype,
                                    device=device).contiguous(memory_format=torch.channels_last)
        self.embeddings = torch.empty((rows, *run.cond.shape[1:]), dtype=run.cond.dtype, device=device)
        self.class_labels = None if run.class_labels is None else torch.empty(rows, dtype=torch.int64, device=device)
        self.noise = torch.zeros((run.steps, *run.x.shape), device=device)
        # An inpainting run's mask (B, 1, H, W) and 1 - mask: the steps keep x where the mask is 0 (keep_masked)
        self.mask = None if run.mask is None else torch.zeros_like(run.mask)
        self.keep = None if run.mask is None else torch.zeros_like(run.mask)
        self.index = torch.zeros(1, dtype=torch.int64, device=device)
        self.guidance = torch.zeros(1, device=device)
        self.values: dict[str, torch.Tensor] | None = None  # the U-Net's text constants, made by the first load
        # Feature caching: what a full step keeps (rows, C, h, w); an unguided step's are the last B rows
        self.kept = None if run.cache is None else kept_buffer(stage, rows, self.model_in, run.cache.depth)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # per step kind: (guided, StageRun.kind_at)

    @staticmethod
    def key(run) -> tuple:
        """What a runner is made for: runs with the same key share one."""
        return (tuple(run.x.shape), run.low_res is not None, run.pair is not None, tuple(run.cond.shape[1:]),
                type(run.sampler).__name__, json.dumps(run.sampler.config, sort_keys=True, default=str), run.steps,
                run.mask is not None, None if run.cache is None else run.cache.depth)

    @torch.inference_mode()
    def load(self, run) -> None:
        """Copy a run's values into the buffers: its sample, conditioning, noise, sampler tables, guidance."""
        self.x.copy_(run.x)
        if run.low_res is not None:  # the same low-res channels for both halves, written once per run
            write_sample(self.model_in, self.x, run.low_res)
        embeddings = run.pair if run.pair is not None else run.cond  # (rows, 77, D)
        self.embeddings.copy_(embeddings)
        if self.class_labels is not None:
            self.class_labels.copy_(run.class_labels[run.pair is not None])
        for step, noise in enumerate(run.noise):
            if noise is None:
                self.noise[step].zero_()
            else:
                self.noise[step].copy_(noise)
        if self.mask is not None:
            self.mask.copy_(run.mask)
            self.keep.copy_(run.keep)
        if run.sampler is not self.sampler:
            self.sampler.load(run.sampler)
        values = self.unet.text_constants(embeddings)
        if self.values is None or values is None:
            self.values = values  # fresh tensors, this runner's from now on
        else:
            for name, value in values.items():
                self.values[name].copy_(value)
        self.index.fill_(run.step)  # 0, or an edit's first step
        self.guidance.fill_(run.settings.guidance)

    def step(self, guided: bool, kind: tuple[str, int] = ("unet", 0)) -> None:
        """One step of a kind (guided or not; the U-Net call, StageRun.kind_at): input assembly, U-Net,
        guidance, sampler update; everything read and written is a buffer."""
        rows = self.model_in.shape[0] if guided else self.batch
        model_in = self.model_in[-rows:]
        write_sample(model_in, self.x, None)
        timestep = at(self.sampler.timesteps, self.index).expand(rows)
        labels = None if self.class_labels is None else self.class_labels[-rows:]
        kept = None if self.kept is None else self.kept[-rows:]
        args = (model_in, timestep, self.embeddings[-rows:], labels)
        out = call_unet(self.unet, kind, args, self.values, kept).float()
        noise = self.noise.index_select(0, self.index)[0]  # (B, C, H, W)
        x = update(self.stage, self.sampler, self.index, out, self.guidance if guided else None, self.x, noise)
        self.x.copy_(x if self.mask is None else keep_masked(self.x, x, self.mask, self.keep))
        self.index.add_(1)

    @torch.inference_mode()
    def denoise(self, run, progress: bool = False, on_step=None) -> None:
        """Step a loaded run to its end; its x becomes the result (a copy: the buffers serve the next run)."""
        captured = self.stage.device.type == "cuda"
        for step in progress_bar(run.step, self.steps, self.stage.name, progress):
            guided, kind = run.guided_steps[step], run.kind_at(step)  # host lists: no sync
            if captured:
                self._graph(guided, kind).replay()
            else:
                self.step(guided, kind)
            if on_step is not None:
                on_step(self.stage.name, step + 1, self.steps)
        run.x = self.x.clone()
        run.step = self.steps

    def _state(self) -> list[torch.Tensor]:
        """Everything a step writes (the sampler's tables too: DPM-Solver keeps its previous x0 there)."""
        kept = [] if self.kept is None else [self.kept]
        return [self.x, self.index, *kept] + [v for v in vars(self.sampler).values() if isinstance(v, torch.Tensor)]

    def _graph(self, guided: bool, kind: tuple[str, int]):
        """The CUDA graph of one step kind, captured on first use; the run's state is kept across the warm-up."""
        if (guided, kind) not in self.graphs:
            state = self._state()
            saved = [t.clone() for t in state]

            def warm():
                self.index.zero_()  # in range whatever the step count
                self.step(guided, kind)

            graph = _capture(self.stage.device, lambda: self.step(guided, kind), warm)
            for tensor, value in zip(state, saved):
                tensor.copy_(value)
            self.graphs[guided, kind] = graph
        return self.graphs[guided, kind]
