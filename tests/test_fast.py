"""The fast path (engine/executor.py, engine/backends/fast_unet.py): static-buffer step runner, device-indexed sampler tables, per-request text
constants, compiled U-Nets cached across processes, and the scheduler on the same U-Nets.

Tolerances, float32, images in [0, 1]: RUNNER_BOUND against the eager loop with its U-Nets in channels_last
too (what is left is the text constants' batched projections and rounding order: about 2e-6 measured);
FAST_BOUND against the plain eager loop for DDPM and DDIM (channels_last convolutions round differently:
1.5e-5 measured). DPM-Solver++ is left out of the second: on a random tiny U-Net its second-order steps
amplify that rounding to 8e-3 in one image, and the plain eager loop in channels_last shows the same 8e-3.
The compiled U-Nets (inductor, frozen weights) are held to FAST_BOUND."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import engine
from engine import GenerateRequest
from engine.backends.fast_unet import FastUNet
from engine.executor import RowBuffers, StepRunner, bucket
from engine.samplers import SAMPLERS, build_sampler
from engine.serve import BatchingScheduler

RUNNER_BOUND = 2e-5
FAST_BOUND = 1e-4
STEPS = (4, 3)


@pytest.fixture(scope="module")
def channels_last_pipe(cascade_dir):
    """The eager loop with its U-Nets in channels_last, the fast path's memory format."""
    pipe = engine.load(cascade_dir)
    for stage in pipe.stages:
        stage.unet.model.to(memory_format=torch.channels_last)
    return pipe


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_fast_path_gives_the_eager_images_for_every_sampler(fast_pipe, engine_pipe, channels_last_pipe, sampler):
    # Two prompts x two images, a guidance interval on stage I (guided and unguided steps in one run).
    options = dict(seed=3, steps=(5, 3), guidance=(6.0, 3.0), num_images_per_prompt=2, scheduler=sampler,
                   output_type="np", guidance_interval=((300, 900), None))
    prompts = ["a red circle", "a blue square"]
    assert all(isinstance(s.unet, FastUNet) and s.executor.static for s in fast_pipe.stages)
    ours = fast_pipe.generate(prompts, **options)
    same_format = channels_last_pipe.generate(prompts, **options)
    assert ours.shape == same_format.shape and same_format.std() > 0.02
    assert np.abs(ours - same_format).max() <= RUNNER_BOUND
    if sampler != "dpm++2m":
        assert np.abs(ours - engine_pipe.generate(prompts, **options)).max() <= FAST_BOUND
    again = fast_pipe.generate(prompts, **options)  # the runners are reused, their buffers refilled
    assert np.array_equal(again, ours)
    other = fast_pipe.generate(prompts, **{**options, "seed": 4})
    assert np.abs(other - channels_last_pipe.generate(prompts, **{**options, "seed": 4})).max() <= RUNNER_BOUND


def test_fast_path_on_the_x4_stage(three_stage_dir, three_stage_pipe):
    pipe = engine.load(three_stage_dir, fast=True)
    for stage in pipe.stages:
        stage.unet.compile = False
    options = dict(seed=1, steps=(3, 2, 3), guidance=(5.0, 3.0, 6.0), output_type="np")
    ours = pipe.generate("a cat", **options)
    eager = three_stage_pipe.generate("a cat", **options)
    assert ours.shape == eager.shape == (1, 128, 128, 3)
    assert np.abs(ours - eager).max() <= FAST_BOUND


def test_text_constants_are_used_in_the_steps(fast_pipe):
    """The steps take the text keys and values from the runner's buffers: spoiling those buffers (and only
    those) changes the image, so they are not recomputed per step."""
    stage = fast_pipe.stages[0]
    assert stage.unet.constants.layers and stage.unet.constants.projection is not None
    options = dict(seed=0, steps=STEPS, guidance=(5.0, 1.0), output_type="np")
    good = fast_pipe.generate("a red circle", **options)
    runner = next(reversed(stage.executor.runners.values()))  # the one this request ran on
    load = runner.load

    def spoiled(run):
        load(run)
        for name, value in runner.values.items():
            if name.endswith(".key"):
                value.mul_(3.0)
    runner.load = spoiled
    try:
        bad = fast_pipe.generate("a red circle", **options)
    finally:
        del runner.load
    assert np.abs(bad - good).max() > 0.01


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_device_indexed_sampler_tables_give_the_python_indexed_results(sampler, cascade_dir):
    config = json.loads((cascade_dir / "stage_I" / "scheduler" / "scheduler_config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 8, 8)
    by_int, by_tensor = (build_sampler(sampler, config, 6) for _ in range(2))
    x_int = x_tensor = torch.randn(shape, generator=gen)
    by_int.start(x_int)
    by_tensor.start(x_tensor)
    index = torch.zeros(1, dtype=torch.int64)
    for i in range(len(by_int)):
        eps, var = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen) * 2 - 1
        noise = torch.randn(shape, generator=gen) if by_int.noise_steps[i] else None
        x_int = by_int.step(i, eps, var, x_int, noise)
        x_tensor = by_tensor.step(index, eps, var, x_tensor, torch.zeros(shape) if noise is None else noise)
        index += 1
        assert torch.equal(x_int, x_tensor), f"step {i}"


def test_the_step_function_traces_whole_with_fullgraph(fast_pipe, engine_pipe):
    """torch.compile(fullgraph=True) refuses a graph break, a host sync (.item(), .tolist()) or a branch on a
    tensor's value: one step, guided and not, traces whole, and the compiled steps give the eager images."""
    options = dict(seed=5, steps=STEPS, guidance=(5.0, 1.0))
    pipe = fast_pipe
    stage = pipe.stages[0]
    request = GenerateRequest("a red circle", **options)
    walk = engine.pipeline.CascadeRun(pipe, request)
    walk.begin()
    run = walk.start_stage()
    runner = StepRunner(stage, run)
    runner.load(run)
    step = torch.compile(runner.step, fullgraph=True, backend="eager")
    with torch.inference_mode():
        for i in range(run.steps):
            step(guided=bool(i % 2))
    eager_walk = engine.pipeline.CascadeRun(engine_pipe, request)
    eager_walk.begin()
    eager_run = eager_walk.start_stage()
    eager_run.guided_steps = [bool(i % 2) for i in range(eager_run.steps)]
    engine_pipe.stages[0].denoise(eager_run)
    assert (runner.x - eager_run.x).abs().max() <= 1e-4


def _scheduled(pipe, requests, joins_at=2):
    """Each request's images through one scheduler: the first alone for `joins_at` steps, the others joining
    then (so stage I and stage II hold requests at once, and calls have row counts between buckets)."""
    scheduler = BatchingScheduler(pipe, max_batch=8)
    futures = [scheduler.submit(requests[0])]
    for _ in range(joins_at):
        scheduler.step()
    futures += [scheduler.submit(r) for r in requests[1:]]
    for _ in range(200):
        if not scheduler.step():
            break
    return [future.result(timeout=0).images for future in futures]


SCHEDULED = [GenerateRequest("a red circle", seed=1, steps=STEPS, output_type="np"),
             GenerateRequest(["a blue square", "a cat"], seed=2, steps=STEPS, guidance=(5.0, 1.0), output_type="np"),
             GenerateRequest("a green square", seed=3, steps=(3, 2), num_images_per_prompt=2, output_type="np",
                             guidance_interval=((300, 900), None))]


def test_scheduler_steps_run_on_the_executors_static_buffers(fast_pipe, engine_pipe):
    """The scheduler's calls go through each stage's executor onto its row-bucket buffers (5 images under
    guidance: 10 rows padded to 16, and so on), and every request gets the images it gets alone, on the fast
    path and eager."""
    calls = []
    scheduler_rows = []
    for stage in fast_pipe.stages:
        stage.executor.buffers.clear()
    batched = _scheduled(fast_pipe, SCHEDULED)
    for stage in fast_pipe.stages:
        for (rows, *_), buffers in stage.executor.buffers.items():
            assert rows == bucket(rows) and buffers.sample.shape[0] == rows
            scheduler_rows.append(rows)
        calls.append(len(stage.executor.buffers))
    assert all(calls) and max(scheduler_rows) == 16  # both stages; all three requests guided in stage I
    for request, images in zip(SCHEDULED, batched):
        alone = fast_pipe.run(request).images
        assert np.abs(images - alone).max() <= RUNNER_BOUND
        assert np.abs(images - engine_pipe.run(request).images).max() <= FAST_BOUND
    assert [bucket(r) for r in (1, 2, 3, 5, 9, 16, 17)] == [1, 2, 4, 8, 16, 16, 17]


def test_the_scheduler_reads_the_text_constants_from_the_buffers(fast_pipe, monkeypatch):
    """Spoiling the text keys in the row buffers (only there, only during the U-Net call) changes the images:
    the scheduler's U-Net calls read them from those buffers, not from anything computed per call."""
    good = _scheduled(fast_pipe, SCHEDULED)
    forward = RowBuffers._forward

    def spoiled(buffers):
        saved = {name: value.clone() for name, value in buffers.values.items()}
        for name, value in buffers.values.items():
            if name.endswith(".key"):
                value.mul_(3.0)
        forward(buffers)
        for name, value in saved.items():
            buffers.values[name].copy_(value)

    monkeypatch.setattr(RowBuffers, "_forward", spoiled)
    bad = _scheduled(fast_pipe, SCHEDULED)
    assert all(np.abs(b - g).max() > 0.01 for b, g in zip(bad, good))
    monkeypatch.setattr(RowBuffers, "_forward", forward)
    again = _scheduled(fast_pipe, SCHEDULED)
    assert all(np.array_equal(a, g) for a, g in zip(again, good))  # the buffers themselves were left intact


def test_warmup_makes_the_runners_and_reports_its_cost(fast_pipe):
    timings = fast_pipe.warmup(images=(1, 2), scheduler_rows=(3,), steps=(2, 2))
    assert set(timings) == {"generate, 1 image(s)", "generate, 2 image(s)", "stage_I U-Net, 4 rows",
                            "stage_II U-Net, 4 rows"}
    assert all(seconds > 0 for seconds in timings.values())
    shapes = {key[0] for key in fast_pipe.stages[0].executor.runners}
    assert {(1, 3, 16, 16), (2, 3, 16, 16)} <= shapes


def test_fast_is_refused_where_it_does_not_apply(cascade_dir):
    with pytest.raises(engine.InvalidRequestError, match="fast="):
        engine.load(cascade_dir, backend="onnxruntime", fast=True)


# One process compiles (AOTInductor packages into the cache), a second loads them: the same images, and
# the second says it loaded every package instead of compiling.
_COMPILED_RUN = """
import json, sys, numpy as np, engine
pipe = engine.load(sys.argv[1], fast=True)
eager = engine.load(sys.argv[1], fast=False)
options = dict(seed=0, steps=(2, 2), guidance=(5.0, 1.0), output_type="np")
ours = pipe.generate("a red circle", **options)
diff = float(np.abs(ours - eager.generate("a red circle", **options)).max())
calls = [c for s in pipe.stages for c in s.unet._compiled.values()]
print(json.dumps({"diff": diff, "cached": [c.cached for c in calls], "seconds": [c.seconds for c in calls]}))
"""


def test_compiled_unets_match_eager_and_a_second_process_reuses_them(cascade_dir, tmp_path):
    env = {**os.environ, "CASCADE_ENGINE_CACHE": str(tmp_path / "cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # inductor's own cache starts empty too

    def run():
        done = subprocess.run([sys.executable, "-c", _COMPILED_RUN, str(cascade_dir)], env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first["cached"] == [False, False] and first["diff"] <= FAST_BOUND
    assert len(list((tmp_path / "cache" / "compiled").glob("*.pt2"))) == 2
    assert len(list((tmp_path / "cache" / "compiled").glob("*.json"))) == 2  # each package's key file
    second = run()
    assert second["cached"] == [True, True] and second["diff"] == first["diff"]
    assert sum(second["seconds"]) < sum(first["seconds"]) / 3


def test_a_compiled_package_is_loaded_only_with_its_key_file_and_hash(tmp_path, monkeypatch, caplog):
    """A package is native code this process runs: one whose bytes or key file do not match is rebuilt, never
    loaded; the directory is owner-only."""
    import stat

    from engine.backends.compiled import CompiledCall, compiled_dir, distrust, package_key, package_name

    monkeypatch.setenv("CASCADE_ENGINE_CACHE", str(tmp_path / "cache"))
    module, args, cpu = torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),), torch.device("cpu")
    first = CompiledCall(module, args, cpu, source=lambda: "a tiny linear")
    assert not first.cached and stat.S_IMODE(compiled_dir().stat().st_mode) == 0o700
    key = package_key("a tiny linear", args, cpu)
    package = compiled_dir() / f"{package_name(key)}.pt2"
    assert distrust(package, key) is None and "another key" in distrust(package, {**key, "torch": "0.0"})
    assert CompiledCall(module, args, cpu, source=lambda: "a tiny linear").cached
    with open(package, "ab") as file:
        file.write(b"\0")  # the zip still opens: only the hash tells
    assert "do not match" in distrust(package, key)
    with caplog.at_level("WARNING", logger="engine.backends.compiled"):
        rebuilt = CompiledCall(module, args, cpu, source=lambda: "a tiny linear")
    assert not rebuilt.cached and "do not match the hash" in caplog.text
    assert torch.allclose(rebuilt(*args), module(*args), atol=1e-5)
    assert distrust(package, key) is None  # rebuilt with its key file
    package.with_suffix(".json").unlink()
    assert distrust(package, key) == "it has no key file"
    compiled_dir().chmod(0o755)
    assert stat.S_IMODE(compiled_dir().stat().st_mode) == 0o700
