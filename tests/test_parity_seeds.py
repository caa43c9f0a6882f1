"""Parity that holds for every seed: 32 seeds through two stages (15 + 12 steps, diffusers' DDPM, the
learned-range variance) and three (the x4 upscaler after them), ours through diffusers' door against
diffusers' pipelines chained with one generator. Reports the worst and the median difference; README states
the bound."""

import numpy as np
import pytest
import torch

from engine.testing.reference import reference_cascade, run_reference

SEEDS = range(32)


def differences(pipe, reference, steps, guidance, noise_level) -> list[float]:
    pipe.set_progress_bar_config(disable=True)
    for stage in reference:
        stage.set_progress_bar_config(disable=True)
    found = []
    for seed in SEEDS:
        ours = pipe("a red circle", num_inference_steps=steps, guidance_scale=guidance, noise_level=noise_level,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
        theirs = run_reference(reference, "a red circle", seed, steps, guidance, noise_level=noise_level)
        found.append(float(np.abs(ours - theirs).max()))
    pipe.progress_bar_config.clear()
    return found


def report(name: str, found: list[float]) -> None:
    print(f"\n{name}: {len(found)} seeds, worst {max(found):.2e}, median {np.median(found):.2e}")


def test_two_stages_give_diffusers_bits_for_every_seed(engine_pipe, reference):
    found = differences(engine_pipe, reference, (15, 12), (7.0, 4.0), 250)
    report("stages I + II", found)
    assert max(found) == 0.0  # the same float32 operations in the same order: the same bits


def test_three_stages_stay_within_the_stated_bound_for_every_seed(three_stage_pipe, three_stage_dir):
    found = differences(three_stage_pipe, reference_cascade(three_stage_dir), (8, 6, 4), (7.0, 4.0, 9.0),
                        (250, 20))
    report("stages I + II + x4 upscaler", found)
    assert max(found) <= 1e-5
