"""Feature caching across steps (DeepCache; the feature-caching issue's first part): the torch backend's shallow
call against its full call, the cache's plan of full steps, the step-level scheduler with cached and uncached
requests in one batch, presets, and the errors. Off, every image is the one it was (the parity tests)."""

import numpy as np
import pytest
import torch

import engine
from engine import GenerateRequest
from engine.errors import InvalidRequestError
from engine.options import Caching, caching
from tests.conftest import scheduled

STEPS = (6, 5)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_shallow_call_on_the_full_calls_own_inputs_is_the_full_call(engine_pipe, depth):
    text = engine_pipe.text.encode(["a red circle", "a blue square"])
    for stage in engine_pipe.stages:
        unet, size = stage.unet, stage.size
        if depth > unet.cache_depths:
            continue
        sample = torch.randn(2, unet.in_channels, size, size, generator=torch.Generator().manual_seed(depth))
        timestep = torch.tensor([700, 300])
        labels = None if stage.noising is None else torch.tensor([250, 100])
        out, kept = unet.full(sample, timestep, text, labels, depth)
        assert torch.equal(out, unet(sample, timestep, text, labels))
        assert torch.equal(unet.shallow(sample, timestep, text, labels, kept, depth), out)


@pytest.mark.parametrize("cache, full", [
    (2, [0, 2, 4]), ({"interval": 3, "full_first": 2}, [0, 1, 3]), ({"refresh": [0, 4]}, [0, 4]),
    ({"interval": 4, "window": [0, 600]}, None),  # full outside the window: read from the timesteps below
])
def test_the_cache_plans_its_full_steps_and_the_unet_runs_them(engine_pipe, cache, full):
    calls = []
    stage = engine_pipe.stages[0]
    # the mid-block runs in full calls only (a shallow call stops above it)
    hook = stage.unet.model.mid_block.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        run = stage.start(engine_pipe.conditioning(GenerateRequest("a red circle"), engine_pipe.settings(
            GenerateRequest("a red circle", steps=STEPS, cache=cache)))[engine_pipe.text],
            None, engine_pipe.settings(GenerateRequest("a red circle", steps=STEPS, cache=cache))[0],
            torch.Generator().manual_seed(0))
        stage.denoise(run)
    finally:
        hook.remove()
    if full is None:
        timesteps = run.sampler.timesteps.tolist()
        full = [k for k, t in enumerate(timesteps) if k % 4 == 0 or not 0 <= t < 600]
    assert [k for k, f in enumerate(run.full_steps) if f] == full and len(calls) == len(full)


def test_caching_changes_pictures_only_when_asked(engine_pipe):
    options = dict(seed=3, steps=STEPS, output_type="np")
    plain = engine_pipe.generate("a red circle", **options)
    assert np.array_equal(engine_pipe.generate("a red circle", cache=None, **options), plain)
    assert np.array_equal(engine_pipe.generate("a red circle", cache=1, **options), plain)  # every step full
    assert np.abs(engine_pipe.generate("a red circle", cache=2, **options) - plain).max() > 1e-3
    per_stage = engine_pipe.generate("a red circle", cache=(None, 2), **options)  # stage II only
    assert not np.array_equal(per_stage, plain)


def test_the_scheduler_keeps_each_requests_cache_whatever_its_batch_mates(engine_pipe):
    requests = [GenerateRequest("a red circle", seed=1, steps=STEPS, cache=2, output_type="np"),
                GenerateRequest("a blue square", seed=2, steps=STEPS, output_type="np"),
                GenerateRequest("a red circle", seed=3, steps=STEPS, cache={"interval": 3, "depth": 1},
                                guidance_interval=(0, 600), output_type="np"),
                GenerateRequest("a red circle", seed=4, steps=(4, 3), cache=2, num_images_per_prompt=2,
                                output_type="np")]
    expected = [engine_pipe.run(request).images for request in requests]
    for images, want in zip(scheduled(engine_pipe, requests, max_batch=8), expected):
        # the scheduler tests' bound for rows batched with others (test_serve_scheduler.py): CPU kernels round a
        # batched call's rows differently (1.4e-5 seen with 2 threads), while another request's cache moves far more
        assert np.abs(images - want).max() <= 1e-4


def test_a_preset_carries_its_cache(engine_pipe):
    engine_pipe.add_preset("cached", [{"steps": 6, "cache": {"interval": 2}}, {"steps": 5, "cache": 3}])
    try:
        settings = engine_pipe.settings(GenerateRequest("a red circle", preset="cached"))
        assert [s.cache for s in settings] == [Caching(interval=2), Caching(interval=3)] == [caching({"interval": 2}),
                                                                                            caching(3)]
        assert np.array_equal(engine_pipe.generate("a red circle", preset="cached", seed=0, output_type="np"),
                              engine_pipe.generate("a red circle", steps=(6, 5), cache=(2, 3), seed=0,
                                                   output_type="np"))
    finally:
        engine_pipe.presets.pop("cached")
        for stage in engine_pipe.stages:
            stage.presets.pop("cached")


@pytest.mark.parametrize("cache, message", [
    (0, "cache interval must be 1..1000, got 0"),
    ({"interval": 2, "colour": 1}, "cache has unknown field\\(s\\) colour"),
    ({"refresh": [1, 3]}, "starting at 0"),
    ({"window": [700, 100]}, "cache window must be a pair"),
    ("often", "cache takes an interval"),
    (True, "cache takes an interval"),
])
def test_bad_cache_settings_are_refused_by_the_request(cache, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerateRequest("a red circle", cache=cache)


@pytest.mark.parametrize("cache, message", [
    ({"depth": 9}, "cache depth 9 is deeper than its U-Net allows"),
    ({"refresh": [0, 40]}, "cache refresh step 40 is past its 6 steps"),
    ((2, 2, 2), "cache has 3 values but the cascade has 2 stages"),
])
def test_cache_settings_the_model_cannot_take_are_refused_before_any_work(engine_pipe, cache, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine_pipe.settings(GenerateRequest("a red circle", steps=STEPS, cache=cache))


def test_kept_shape_is_what_a_full_call_keeps(engine_pipe, three_stage_pipe):
    for pipe in (engine_pipe, three_stage_pipe):
        for stage in pipe.stages:
            unet, size = stage.unet, 16 if stage.kind == "latent_upscaler" else stage.size
            text = (stage.text or pipe.text).encode(["a red circle"])
            labels = None if stage.noising is None else torch.tensor([20])
            for depth in range(1, unet.cache_depths + 1):
                sample = torch.randn(1, unet.in_channels, size, size)
                _, kept = unet.full(sample, torch.tensor([500]), text, labels, depth)
                assert tuple(kept.shape) == unet.kept_shape(1, size, size, depth)


CACHED = [GenerateRequest("a red circle", seed=1, steps=STEPS, cache=2, output_type="np"),
          GenerateRequest("a blue square", seed=2, steps=STEPS, output_type="np"),
          GenerateRequest("a red circle", seed=3, steps=STEPS, cache=({"interval": 3, "full_first": 2}, 2),
                          guidance_interval=(0, 600), output_type="np"),
          GenerateRequest("a green square", seed=4, steps=(4, 3), cache=({"refresh": [0, 3]}, 2),
                          num_images_per_prompt=2, output_type="np")]


def test_the_fast_path_caches_as_the_eager_path_does(fast_pipe, engine_pipe):
    """Full and shallow steps on the StepRunner's buffers, and on the scheduler's row buffers with cached and
    uncached requests in one batch: the eager path's images, within the fast path's bound (test_fast.py)."""
    for request in CACHED:
        want = engine_pipe.run(request).images
        assert np.abs(fast_pipe.run(request).images - want).max() <= 1e-4
    for images, request in zip(scheduled(fast_pipe, CACHED, max_batch=8), CACHED):
        assert np.abs(images - engine_pipe.run(request).images).max() <= 1e-4
    kinds = {key[-1] for stage in fast_pipe.stages for key in stage.executor.buffers}
    assert {("unet", 0), ("full", 1), ("shallow", 1)} <= kinds


def test_shallow_steps_read_the_kept_features_from_the_buffers(fast_pipe):
    """Spoiling the StepRunner's kept buffer before each shallow step changes the image: shallow steps run on
    it. Without caching nothing reads it."""
    from engine.executor import StepRunner

    request = CACHED[0]
    good = fast_pipe.run(request).images
    step = StepRunner.step

    def spoiled(runner, guided, kind=("unet", 0)):
        if kind[0] == "shallow":
            runner.kept.mul_(0.5)
        step(runner, guided, kind)

    StepRunner.step = spoiled
    try:
        bad = fast_pipe.run(request).images
    finally:
        StepRunner.step = step
    assert np.abs(bad - good).max() > 1e-2
    assert np.array_equal(fast_pipe.run(request).images, good)


def test_cache_from_the_command_line_the_api_and_batch_rows(cascade_dir, engine_pipe, tmp_path):
    import json

    from PIL import Image

    from engine.cli import main
    from engine.offline import batch
    from engine.options import request_from_api

    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--model", str(cascade_dir), "--steps", "6", "5", "--cache", "2",
                 "--seed", "1", "-o", str(out), "--quiet"]) == 0
    expected = engine_pipe.generate("a red circle", steps=STEPS, cache=2, seed=1)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    assert request_from_api({"prompt": "x", "cache": [2, {"interval": 3}]}).cache == (2, {"interval": 3})
    steps_out = tmp_path / "steps.png"
    assert main(["generate", "a red circle", "--model", str(cascade_dir), "--steps", "6", "5", "--cache-steps",
                 "0,2,4", "none", "--seed", "1", "-o", str(steps_out), "--quiet"]) == 0
    by_steps = engine_pipe.generate("a red circle", steps=STEPS, cache=({"refresh": [0, 2, 4]}, None), seed=1)[0]
    assert np.array_equal(np.asarray(Image.open(steps_out).convert("RGB")), np.asarray(by_steps))
    both = ["generate", "a red circle", "--cache", "2", "--cache-steps", "0,3", "-o", str(tmp_path / "x.png")]
    assert main(both) != 0 and not (tmp_path / "x.png").exists()  # refused: give one of them
    summary = batch([{"prompt": "a red circle", "seed": 1, "steps": [6, 5], "cache": 2}], tmp_path / "job",
                    model=engine_pipe, progress=False)
    entry = json.loads((tmp_path / "job" / "manifest.jsonl").read_text().splitlines()[0])
    assert summary.images_written == 1 and entry["request"]["cache"] == 2
    assert entry["stages"]["stage_I"]["cache"]["interval"] == 2  # the resolved settings, as they ran
    made = Image.open(tmp_path / "job" / entry["file"]).convert("RGB")
    assert np.array_equal(np.asarray(made), np.asarray(expected))


def test_the_http_field(engine_pipe):
    import base64
    import io
    import time

    from PIL import Image
    from starlette.testclient import TestClient

    from engine.serve.http import create_app

    with TestClient(create_app(engine_pipe, max_batch=4, warmup=False)) as client:
        deadline = time.monotonic() + 30
        while client.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = client.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 1, "steps": [6, 5],
                                                              "cache": [None, {"interval": 2}]})
        assert answer.status_code == 200, answer.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))))
        want = np.asarray(engine_pipe.generate("a red circle", seed=1, steps=STEPS, cache=(None, 2))[0])
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        bad = client.post("/v1/images/generations", json={"prompt": "a red circle", "cache": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache"


def test_a_service_gives_its_speed_settings_to_requests_that_name_none(engine_pipe):
    """create_app(request_defaults=...) (serve --preset/--cache/--cache-steps): a request naming no preset and no
    cache gets the service's; one naming either keeps its own; bad defaults are refused before any model work."""
    import base64
    import io
    import time

    from PIL import Image
    from starlette.testclient import TestClient

    from engine.serve.http import create_app

    def image(answer):
        assert answer.status_code == 200, answer.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))).astype(int)

    def want(**options):
        return np.asarray(engine_pipe.generate("a red circle", seed=1, steps=STEPS, **options)[0]).astype(int)

    with TestClient(create_app(engine_pipe, max_batch=4, warmup=False, request_defaults={"cache": [None, 2]})) as client:
        deadline = time.monotonic() + 30
        while client.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        body = {"prompt": "a red circle", "seed": 1, "steps": [6, 5]}
        assert np.abs(image(client.post("/v1/images/generations", json=body)) - want(cache=(None, 2))).max() <= 1
        own = image(client.post("/v1/images/generations", json={**body, "cache": 3}))
        assert np.abs(own - want(cache=3)).max() <= 1
    for bad, message in (({"cache": 0}, "cache interval must be 1..1000"), ({"steps": 4}, "request_defaults takes")):
        with pytest.raises(InvalidRequestError, match=message):
            create_app(engine_pipe, warmup=False, request_defaults=bad)


def test_the_x4_upscalers_unet_caches_too(three_stage_pipe):
    stage = three_stage_pipe.stages[2]
    unet = stage.unet
    text = stage.text.encode(["a red circle", "a blue square"])
    sample = torch.randn(2, unet.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    timestep, labels = torch.tensor([900, 400]), torch.tensor([20, 20])
    out, kept = unet.full(sample, timestep, text, labels, 1)
    assert torch.equal(unet.shallow(sample, timestep, text, labels, kept, 1), out)
    options = dict(seed=1, steps=(3, 2, 4), output_type="np")
    plain = three_stage_pipe.generate("a red circle", **options)
    cached = three_stage_pipe.generate("a red circle", cache=(None, None, 2), **options)
    assert cached.shape == plain.shape and not np.array_equal(cached, plain)


def test_warmup_makes_the_cached_presets_step_kinds(fast_pipe):
    """A service start (pipe.warmup) makes the full and shallow buffers of each caching depth the presets use,
    so a cached request's first step does not compile."""
    fast_pipe.add_preset("cached", [{"cache": 2}, None])
    try:
        timings = fast_pipe.warmup(images=(), scheduler_rows=(3,))
    finally:
        fast_pipe.presets.pop("cached")
        for stage in fast_pipe.stages:
            stage.presets.pop("cached")
    assert set(timings) == {"stage_I U-Net, 4 rows", "stage_I U-Net, 4 rows, full 1",
                            "stage_I U-Net, 4 rows, shallow 1", "stage_II U-Net, 4 rows"}
    kinds = {key[-1] for key in fast_pipe.stages[0].executor.buffers if key[0] == 4}
    assert kinds >= {("unet", 0), ("full", 1), ("shallow", 1)}


def test_a_batch_job_warms_the_step_kinds_its_rows_run(fast_pipe, tmp_path):
    """engine.batch's warm-up makes the caching kinds its rows use, not every preset's: rows caching stage I
    only leave stage II's full and shallow buffers unmade, though a preset caches there."""
    from engine.offline import batch

    fast_pipe.add_preset("cached", [None, {"cache": 2}])
    for stage in fast_pipe.stages:
        stage.executor.buffers.clear()
    try:
        summary = batch([{"prompt": "a red circle", "seed": 1, "steps": [4, 3], "cache": [2, None]}],
                        tmp_path / "job", model=fast_pipe, max_batch=2, progress=False)
    finally:
        fast_pipe.presets.pop("cached")
        for stage in fast_pipe.stages:
            stage.presets.pop("cached")
    assert summary.images_written == 1 and summary.warmup_seconds > 0
    kinds = [{key[-1] for key in stage.executor.buffers} for stage in fast_pipe.stages]
    assert kinds[0] == {("unet", 0), ("full", 1), ("shallow", 1)} and kinds[1] == {("unet", 0)}
    warmed = {key[0] for key in fast_pipe.stages[0].executor.buffers if key[-1] == ("shallow", 1)}
    assert warmed == {1, 2, 4}  # every bucket up to 2 x max_batch rows, before any row ran
