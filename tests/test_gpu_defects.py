"""Defects that show on a GPU only (issue 43), each pinned on CPU where its cause can be seen.

- ORT and TensorRT on the default stream (handle 0, which ORT reads as "no stream of yours"): the stream a
  run takes is a pure choice (backends/streams.py), checked here with plain handles.
- Offload with feature caching: a shallow or full call puts its U-Net on the device as a plain call does.
- The full call traced whole (no hook registered per call): torch.compile(fullgraph=True) takes full and shallow.
- attention="auto" timed as the U-Net will run, the timings kept on the U-Net.
- The memory plan counts the fast path's static buffers and CUDA-graph pool.
"""

import os

import pytest
import torch

import engine
from engine import GenerateRequest

if not torch.cuda.is_available():  # attention="auto" times the kernel on CPU tensors: the interpreter only
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _inputs(engine_pipe, stage, seed: int = 0):
    """(sample, timestep, text, labels) of a 2-row call of `stage`'s U-Net."""
    unet, size = stage.unet, stage.size
    text = engine_pipe.text.encode(["a red circle", "a blue square"])
    sample = torch.randn(2, unet.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    labels = None if stage.noising is None else torch.tensor([250, 100])
    return sample, torch.tensor([700, 300]), text, labels


# -- the stream ONNX Runtime and TensorRT run on ----------------------------------------------------------------

DEFAULT, OWN, CALLERS, OTHER = 0, 0x7F01, 0x7F02, 0x7F03  # stream handles: 0 is the default stream


@pytest.mark.parametrize("current, fixed, expected", [
    (DEFAULT, None, (OWN, True)),  # torch on the default stream: ours, ordered with it on both sides
    (CALLERS, None, (CALLERS, False)),  # a caller's stream: run on it, in order by construction
    (DEFAULT, OWN, (OWN, True)),  # an ORT session made on the default stream, run there too
    (CALLERS, OWN, (OWN, True)),  # ... and run under a caller's stream later: its stream is fixed, so ordered
    (CALLERS, CALLERS, (CALLERS, False)),  # a session made under a caller's stream, run under it
    (OTHER, CALLERS, (CALLERS, True)),  # ... and run under another one
    (DEFAULT, CALLERS, (CALLERS, True)),
])
def test_a_run_never_goes_on_the_default_stream_and_is_ordered_where_streams_differ(current, fixed, expected):
    from engine.backends.streams import compute_stream

    assert compute_stream(current, OWN, fixed) == expected
    assert compute_stream(current, OWN, fixed)[0] != DEFAULT


def test_the_own_stream_and_an_ort_sessions_stream_are_never_the_default_one():
    from engine.backends.onnxruntime_backend import provider_options
    from engine.backends.streams import compute_stream

    with pytest.raises(ValueError, match="non-default"):
        compute_stream(DEFAULT, DEFAULT)
    cuda = torch.device("cuda", 1)
    assert provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"], cuda, OWN) == [
        ("CUDAExecutionProvider", {"device_id": "1", "has_user_compute_stream": "1", "user_compute_stream": str(OWN)}),
        "CPUExecutionProvider"]
    for stream in (DEFAULT, None):  # 0 reads as "no stream" to ORT: refused, not passed on
        with pytest.raises(ValueError, match="non-default stream"):
            provider_options(["CUDAExecutionProvider"], cuda, stream)
    assert provider_options(["CPUExecutionProvider"], torch.device("cpu")) == ["CPUExecutionProvider"]


# -- the full call traced whole ---------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [0, 1])  # the base U-Net, and the super-resolution one (class labels)
def test_full_and_shallow_calls_trace_whole_and_give_the_plain_output(engine_pipe, index):
    """fullgraph=True refuses a graph break: registering a hook inside the call (as `full` did) is one."""
    stage = engine_pipe.stages[index]
    unet = stage.unet
    sample, timestep, text, labels = _inputs(engine_pipe, stage, index)
    depth = unet.cache_depths
    torch._dynamo.reset()
    full = torch.compile(lambda *a: unet.full(*a, depth), fullgraph=True, backend="eager")
    shallow = torch.compile(lambda *a: unet.shallow(*a, depth), fullgraph=True, backend="eager")
    with torch.inference_mode():
        plain = unet(sample, timestep, text, labels)
        out, kept = unet.full(sample, timestep, text, labels, depth)
        traced_out, traced_kept = full(sample, timestep, text, labels)
        assert torch.equal(out, plain)  # the full call is the plain forward, to the bit
        assert kept.shape == unet.kept_shape(2, stage.size, stage.size, depth)
        assert torch.equal(traced_out, out) and torch.equal(traced_kept, kept)
        assert torch.equal(unet.shallow(sample, timestep, text, labels, kept, depth), plain)
        assert torch.equal(shallow(sample, timestep, text, labels, kept), plain)


# -- offload with feature caching ------------------------------------------------------------------------------

def test_offload_puts_each_unet_on_for_its_full_and_shallow_calls(cascade_dir):
    """Full and shallow calls call the U-Net's blocks directly, not its forward: they must still enter by a
    module offload hooks. Each U-Net call (its conv_in runs in every kind) finds its part alone on the device:
    called right after another part ran, and as the scheduler alternates stages under caching."""
    from tests.conftest import scheduled

    pipe = engine.load(cascade_dir, offload="model")
    offloader = pipe.offloader
    seen = []  # (part, the parts on the device) at each U-Net call, after the offloader's own hooks
    for stage in pipe.stages:
        stage.unet.model.conv_in.register_forward_pre_hook(
            lambda module, args, name=f"{stage.name}.unet": seen.append((name, list(offloader.resident))))
    base, sr = pipe.stages
    part = {p.name: p for p in offloader.parts}
    with torch.inference_mode():
        for stage, other in ((base, "stage_II.unet"), (sr, "stage_I.unet")):
            sample, timestep, text, labels = _inputs(pipe, stage)
            offloader.activate(part[other])
            _, kept = stage.unet.full(sample, timestep, text, labels, 1)
            offloader.activate(part[other])
            stage.unet.shallow(sample, timestep, text, labels, kept, 1)
    assert seen == [("stage_I.unet", ["stage_I.unet"])] * 2 + [("stage_II.unet", ["stage_II.unet"])] * 2

    # The scheduler calls the fullest stage: a 2-image request arriving while a cached one is in stage II
    # takes stage I over, and then stage II goes on with a shallow step (it sorts before the newcomer's plain one).
    from engine.serve import BatchingScheduler

    seen.clear()
    deep = []  # mid-block calls: full calls only
    for stage in pipe.stages:
        stage.unet.model.mid_block.register_forward_pre_hook(lambda module, args: deep.append(1))
    scheduler = BatchingScheduler(pipe, max_batch=4)
    first = scheduler.submit(GenerateRequest("a red circle", seed=1, steps=(2, 6), cache=(None, 3)))
    while len([name for name, _ in seen if name == "stage_II.unet"]) < 2:  # into stage II, past its full step
        scheduler.step()
    second = scheduler.submit(GenerateRequest("a blue square", seed=2, steps=(3, 2), num_images_per_prompt=2))
    while scheduler.step():
        pass
    first.result(timeout=0), second.result(timeout=0)
    names = [name for name, _ in seen]
    switch = names.index("stage_I.unet", names.index("stage_II.unet"))  # stage I again, then back to stage II
    assert names[switch + 3] == "stage_II.unet" and len(deep) < len(seen)
    assert all(resident == [name] for name, resident in seen), seen


# -- attention="auto" timed as it runs -------------------------------------------------------------------------

def _fresh_unet(cascade_dir, stage: str = "stage_I"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(cascade_dir / stage / "unet").eval()


@pytest.mark.parametrize("cost, winner", [({"sdpa": 3e-3, "triton": 1e-3}, "triton"),
                                          ({"sdpa": 1e-3, "triton": 3e-3}, "sdpa")])
def test_auto_attention_keeps_the_choice_its_timer_finds_faster(cascade_dir, cost, winner):
    """by_timing with a clock that says how long each choice takes: the call is made after the choice is
    installed (a compiled call compiles with it), warmed untimed, timed `calls` times; the faster stays."""
    from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

    from engine.backends.attention import AddedKVProcessor, by_timing

    model = _fresh_unet(cascade_dir)
    made, ran = [], []

    def installed() -> str:
        ours = any(isinstance(p, AddedKVProcessor) for p in model.attn_processors.values())
        return "triton" if ours else "sdpa"

    def make_call():
        made.append(installed())
        return lambda: ran.append(installed())  # no forward: Triton runs only interpreted on a CPU

    def timer(call) -> float:
        call()
        return cost[ran[-1]]

    best, seconds = by_timing(model, make_call, timer, calls=3)
    assert best == winner and seconds == cost and best == min(seconds, key=seconds.get)
    assert made == ["sdpa", "triton"] and ran == ["sdpa"] * 4 + ["triton"] * 4  # one warm call each, untimed
    kept = {type(p) for p in model.attn_processors.values()}
    assert kept == ({AddedKVProcessor} if winner == "triton" else {AttnAddedKVProcessor2_0})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors through the kernel need "
                    "TRITON_INTERPRET=1 (on a GPU, tests/test_gpu.py loads with auto there)")
def test_a_unet_loaded_with_auto_carries_its_timings_and_their_argmin(cascade_dir):
    """TorchComponents.unet under "auto" (what engine.load resolves it to on CUDA with Triton; on a CPU it
    resolves to sdpa untimed): each U-Net keeps attention_seconds, median seconds per choice, and its
    attention is their argmin. Triton runs interpreted here: the tiny U-Nets make that a few seconds."""
    pytest.importorskip("triton")
    from engine.backends.attention import resolve_attention
    from engine.backends.torch_backend import TorchComponents
    from engine.model_dir import read_stages, stage_dirs

    cpu = torch.device("cpu")
    components = TorchComponents(cpu, torch.float32, "auto")
    unet = components.unet(read_stages(stage_dirs([cascade_dir]))[0])  # the base U-Net: the interpreter is slow
    assert set(unet.attention_seconds) == {"sdpa", "triton"}
    assert all(s > 0 for s in unet.attention_seconds.values())
    assert unet.attention == min(unet.attention_seconds, key=unet.attention_seconds.get)
    assert resolve_attention("auto", cpu) == "sdpa"
    untimed = engine.load(cascade_dir, attention="auto")
    assert all(stage.unet.attention == "sdpa" and stage.unet.attention_seconds is None for stage in untimed.stages)


def test_the_timed_call_is_two_rows_at_the_models_size(cascade_dir):
    """example_call: the pipeline's 2 rows (one guided image) at the model's sample size, its output the
    model's own for those inputs; on the fast path the sample is channels_last, as FastUNet passes it."""
    from engine.backends.torch_backend import example_call

    model = _fresh_unet(cascade_dir, "stage_II")  # a super-resolution U-Net: class labels too
    shapes = []
    hook = model.conv_in.register_forward_pre_hook(lambda module, args: shapes.append(
        (tuple(args[0].shape), args[0].is_contiguous(memory_format=torch.channels_last))))
    with torch.inference_mode():
        out = example_call(model, torch.device("cpu"))()
    hook.remove()
    size = model.config.sample_size
    assert shapes == [((2, model.config.in_channels, size, size), False)]
    assert out.shape == (2, model.config.out_channels, size, size)


# -- the memory plan on the fast path --------------------------------------------------------------------------

def _bytes(*tensors) -> int:
    """Bytes of the tensors given (None skipped; a dict's values)."""
    found = []
    for t in tensors:
        found += list(t.values()) if isinstance(t, dict) else [] if t is None else [t]
    return sum(t.numel() * t.element_size() for t in found)


def test_the_plans_static_buffers_are_what_the_executor_allocates(fast_pipe, cascade_dir):
    """static_buffers from the configs on the meta device, against the executor's own buffers on CPU (the same
    shapes it makes on CUDA): a RowBuffers per row bucket a 1-image request's calls run at, and the StepRunner of
    a 1-image run at the stage's default steps."""
    from engine.model_dir import read_stages, stage_dirs
    from engine.plan import build, parts_of, row_buckets, static_buffers

    parts = {p.name: p for p in parts_of(read_stages(stage_dirs([cascade_dir])), torch.float32)}
    fast_pipe.generate("a red circle", seed=0)  # default steps: one StepRunner per stage
    text = fast_pipe.text.encode(["a red circle"])  # (1, 77, D)
    assert row_buckets(1) == [1, 2] and row_buckets(3) == [1, 2, 4, 8] and row_buckets(10) == [1, 2, 4, 8, 16, 20]
    for stage in fast_pipe.stages:
        for rows in row_buckets(1):
            stage.executor.warmup(rows, text)
        buffers = [b for key, b in stage.executor.buffers.items() if key[0] in (1, 2) and key[-1] == ("unet", 0)]
        (runner,) = stage.executor.runners.values()
        allocated = sum(_bytes(b.sample, b.timestep, b.embeddings, b.class_labels, b.values, b.out) for b in buffers)
        allocated += _bytes(runner.x, runner.model_in, runner.embeddings, runner.class_labels, runner.noise,
                            runner.index, runner.guidance, runner.values)
        part = parts[f"{stage.name}.unet"]
        assert len(buffers) == 2 and static_buffers(build(part), part, 1) == allocated


def test_the_fast_paths_memory_grows_with_its_row_buckets(cascade_dir):
    from engine.model_dir import read_stages, stage_dirs
    from engine.plan import memory_plan, parts_of

    parts = parts_of(read_stages(stage_dirs([cascade_dir])), torch.float16)
    eager, one, four = memory_plan(parts, images=1), memory_plan(parts, images=1, fast=True), \
        memory_plan(parts, images=4, fast=True)
    assert eager.static == 0 and eager.graph_pool == 0 and all(p.static == 0 for p in eager.phases)
    assert set(one.static_buffers) == {"stage_I.unet", "stage_II.unet"}
    for name in one.static_buffers:  # buckets 1, 2 against 1, 2, 4, 8
        assert four.static_buffers[name] > one.static_buffers[name] > 0
    assert four.graph_pool > one.graph_pool > 0  # the largest bucket's activations: 8 rows against 2
    assert all(p.static == one.static for p in one.phases)  # made at a stage's first call, kept in every phase
    assert one.peak == eager.peak + one.static
    assert "fast path's static buffers and graph pool" in one.table() and "CUDA-graph pool" in one.table()


def test_a_load_that_fits_only_without_the_fast_paths_buffers_is_refused_naming_them(cascade_dir):
    from engine.errors import InvalidRequestError
    from engine.model_dir import read_stages, stage_dirs
    from engine.plan import memory_plan, parts_of, refuse_what_cannot_fit

    specs = read_stages(stage_dirs([cascade_dir]))
    cuda = torch.device("cuda")
    eager = memory_plan(parts_of(specs, torch.float16)).peak
    fast = memory_plan(parts_of(specs, torch.float16), fast=True).peak
    free = (eager + fast) // 2
    assert refuse_what_cannot_fit(specs, torch.float16, None, True, 1, cuda, free=free).peak == eager
    with pytest.raises(InvalidRequestError, match=r"(?s)GB of them the fast path's static buffers and CUDA-graph "
                                                  r"pool, for row buckets up to 2 rows\), which has .*load it with "
                                                  r"fast=False \(--no-fast\)\n.*CUDA-graph pool"):
        refuse_what_cannot_fit(specs, torch.float16, None, True, 1, cuda, free=free, fast=True)
    with pytest.raises(InvalidRequestError, match="fast=False \\(--no-fast\\), and offload='model'"):
        refuse_what_cannot_fit(specs, torch.float16, None, True, 1, cuda, free=1000, fast=True)
