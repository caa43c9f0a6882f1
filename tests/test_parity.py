"""The correctness anchor: same seed, same images as diffusers' IF pipelines (CPU float32, max abs <= 1e-4)."""

import numpy as np
import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import engine
from engine.schedules import named_timesteps
from tests.conftest import diffusers_cascade

TOLERANCE = 1e-4


@pytest.mark.parametrize("prompt,seed,steps,guidance", [
    ("a red circle on a blue background", 0, (4, 3), (7.0, 4.0)),
    ("A small yellow triangle at the top left", 1234, (10, 5), (5.0, 2.0)),
    ("", 2**63 - 1, (2, 2), (3.0, 1.5)),
])
def test_matches_diffusers(engine_pipe, reference, prompt, seed, steps, guidance):
    ours = engine_pipe.generate(prompt, seed=seed, steps=steps, guidance=guidance, output_type="np")
    theirs = diffusers_cascade(reference, prompt, seed, steps, guidance)
    assert ours.shape == theirs.shape == (1, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_batch_of_prompts_with_several_images_each(engine_pipe, reference):
    prompts = ["a green square", "a large purple star on a white background"]
    ours = engine_pipe.generate(prompts, seed=7, num_images_per_prompt=2, steps=(3, 2), guidance=(6.0, 3.0),
                                output_type="np")
    theirs = diffusers_cascade(reference, prompts, 7, (3, 2), (6.0, 3.0), n=2)
    assert ours.shape == (4, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_named_schedule_and_negative_prompt(engine_pipe, reference):
    ours = engine_pipe.generate("a blue disc", negative_prompt="red", seed=3, steps=("smart27", "smart27"),
                                guidance=(7.0, 4.0), noise_level=100, output_type="np")
    smart = named_timesteps("smart27")
    theirs = diffusers_cascade(reference, "a blue disc", 3, (smart, smart), (7.0, 4.0), negative="red",
                               noise_level=100)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("name,cls", [("ddim", DDIMScheduler), ("dpm++2m", DPMSolverMultistepScheduler)])
def test_other_samplers_match_diffusers(engine_pipe, reference, name, cls):
    ours = engine_pipe.generate("a white heart", seed=5, steps=(6, 4), guidance=(7.0, 4.0), scheduler=name,
                                output_type="np")
    theirs = diffusers_cascade(reference, "a white heart", 5, (6, 4), (7.0, 4.0), scheduler_cls=cls)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_guidance_one_drops_the_unconditional_half(engine_pipe, reference):
    calls = []
    unet = engine_pipe.stages[0].unet
    original = unet.__call__
    engine_pipe.stages[0].unet = lambda sample, *a, **k: (calls.append(sample.shape[0]), original(sample, *a, **k))[1]
    try:
        ours = engine_pipe.generate("a gray ring", seed=2, steps=(3, 2), guidance=(1.0, 1.0), output_type="np")
    finally:
        engine_pipe.stages[0].unet = unet
    assert calls == [1, 1, 1]  # batch 1, not 2: no unconditional copy
    theirs = diffusers_cascade(reference, "a gray ring", 2, (3, 2), (1.0, 1.0))
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_a_different_seed_gives_different_images(engine_pipe):
    a = engine_pipe.generate("a red circle", seed=0, steps=(2, 2), output_type="np")
    b = engine_pipe.generate("a red circle", seed=1, steps=(2, 2), output_type="np")
    assert np.abs(a - b).max() > 10 * TOLERANCE


def test_loading_stage_dirs_equals_loading_cascade_json(cascade_dir, engine_pipe, reference):
    by_dirs = engine.load(cascade_dir / "stage_I", cascade_dir / "stage_II", device="cpu")
    ours = by_dirs.generate("a tiny orange box", seed=11, steps=(3, 3), guidance=(7.0, 4.0), output_type="np")
    theirs = diffusers_cascade(reference, "a tiny orange box", 11, (3, 3), (7.0, 4.0))
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_v_prediction_stages_match_diffusers(tmp_path):
    # The packaged shapes model's U-Nets predict v (engine/demo/train.py); IF's scheduler configs say so.
    from engine.testing.random_models import TinyCascadeSpec, write_if_cascade
    from engine.testing.reference import reference_cascade

    root = write_if_cascade(tmp_path / "v", TinyCascadeSpec(prediction_types=("v_prediction", "v_prediction")), seed=4)
    ours = engine.load(root, device="cpu").generate("a red circle", seed=1, steps=(5, 6), noise_level=100,
                                                     output_type="np")
    theirs = diffusers_cascade(reference_cascade(root), "a red circle", 1, (5, 6), (7.0, 4.0), noise_level=100)
    assert np.abs(ours - theirs).max() <= TOLERANCE
