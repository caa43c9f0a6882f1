"""Guidance limited to an interval of the schedule (Kynkäänniemi et al. 2024): the whole schedule is full
guidance, an empty interval is no guidance, a step outside runs half the rows, batching changes nothing, and bad
intervals are refused before any model work."""

import numpy as np
import pytest

from engine import GenerateRequest, InvalidRequestError
from engine.serve import BatchingScheduler

STEPS = (4, 3)
GUIDED = (7.0, 4.0)


def images(pipe, **options):
    return pipe.generate("a red circle", seed=3, steps=options.pop("steps", STEPS), output_type="np", **options)


def test_the_whole_schedule_is_full_guidance_and_none_of_it_is_no_guidance(engine_pipe):
    full = images(engine_pipe, guidance=GUIDED)
    np.testing.assert_array_equal(images(engine_pipe, guidance=GUIDED, guidance_interval=(0, 1000)), full)
    unguided = images(engine_pipe, guidance=1.0)
    np.testing.assert_array_equal(images(engine_pipe, guidance=GUIDED, guidance_interval=(500, 500)), unguided)
    limited = images(engine_pipe, guidance=GUIDED, guidance_interval=((400, 1000), None))
    assert np.abs(limited - full).max() > 1e-3 and np.abs(limited - unguided).max() > 1e-3  # it does something


def test_a_step_outside_the_interval_runs_the_conditional_half_only(engine_pipe, monkeypatch):
    stage = engine_pipe.stages[0]
    rows = []
    real = stage.unet

    def counting(sample, *rest):
        rows.append(sample.shape[0])
        return real(sample, *rest)

    monkeypatch.setattr(stage, "unet", counting)
    request = GenerateRequest("a red circle", seed=1, steps=STEPS, guidance=GUIDED,
                              guidance_interval=((500, 1000), None), num_images_per_prompt=2)
    timesteps = [t for t in _timesteps(engine_pipe, request)]
    engine_pipe.run(request)
    assert rows == [4 if 500 <= t < 1000 else 2 for t in timesteps]
    assert 2 in rows and 4 in rows  # both kinds of step, for this schedule


def _timesteps(pipe, request):
    from engine.samplers import build_sampler

    stage, settings = pipe.stages[0], pipe.settings(request)[0]
    sampler = build_sampler(settings.sampler or stage.default_sampler, stage.scheduler_config, settings.timesteps,
                            stage.device)
    return sampler.timesteps.tolist()


def test_batched_or_alone_the_same_images(engine_pipe):
    scheduler = BatchingScheduler(engine_pipe, max_batch=8)
    requests = [GenerateRequest("a red circle", seed=1, steps=STEPS, guidance=GUIDED, output_type="np",
                                guidance_interval=(600, 1000)),
                GenerateRequest("a blue square", seed=2, steps=STEPS, guidance=GUIDED, output_type="np"),
                GenerateRequest("a green triangle", seed=3, steps=(3, 3), guidance=GUIDED, output_type="np",
                                guidance_interval=((0, 300), (200, 1000)), num_images_per_prompt=2)]
    futures = [scheduler.submit(r) for r in requests]
    for _ in range(200):
        if not scheduler.step():
            break
    for future, request in zip(futures, requests):
        assert np.abs(future.result(timeout=0).images - engine_pipe.run(request).images).max() <= 1e-4


def test_the_x4_upscaler_takes_an_interval_too(three_stage_pipe):
    steps, guidance = (2, 2, 3), (7.0, 4.0, 9.0)
    full = images(three_stage_pipe, steps=steps, guidance=guidance)
    whole = images(three_stage_pipe, steps=steps, guidance=guidance, guidance_interval=(0, 1000))
    np.testing.assert_array_equal(whole, full)
    limited = images(three_stage_pipe, steps=steps, guidance=guidance, guidance_interval=(None, None, (500, 1000)))
    assert limited.shape == full.shape and np.isfinite(limited).all()


@pytest.mark.parametrize("interval, message", [
    ((600, 500), "0 <= lo <= hi <= 1000"),
    ((-1, 10), "0 <= lo <= hi <= 1000"),
    ((0, 1001), "0 <= lo <= hi <= 1000"),
    ((0, 500, 900), "pair of timesteps"),
    ((True, 500), "pair of timesteps"),
    ((0.5, 500), "pair of timesteps"),
    ("0:500", "pair of timesteps"),
    ([], "pair of timesteps"),
    (((0, 500), (0, 500, 1)), "pair of timesteps"),
])
def test_bad_intervals_are_refused_at_once(interval, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerateRequest("a red circle", guidance_interval=interval)


def test_one_interval_per_stage_must_match_the_cascade(engine_pipe):
    with pytest.raises(InvalidRequestError, match="guidance_interval has 3 values but the cascade has 2"):
        engine_pipe.generate("a red circle", steps=STEPS, guidance_interval=((0, 500), None, None))
