"""Stage III, the x4 latent upscaler: same images as diffusers' three pipelines in a row, its defaults, its
limits and its loading errors."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import engine
from engine import InvalidRequestError, ModelError
from engine.cli import main
from engine.options import STAGE_DEFAULTS, GenerateRequest
from engine.reference import reference_cascade, run_reference

STEPS = (4, 3, 5)


@pytest.fixture(scope="module")
def reference3(three_stage_dir):
    return reference_cascade(three_stage_dir)


@pytest.mark.parametrize("prompts, n, negative, guidance, noise_level, seed", [
    ("a red circle on a blue background", 1, None, (7.0, 4.0, 9.0), (250, 20), 0),
    (["a small green square", "a large yellow triangle at the top"], 2, ["black", "white"], (5.0, 3.0, 6.0),
     (100, 150), 7),
])
def test_three_stage_cascade_matches_diffusers(three_stage_pipe, reference3, prompts, n, negative, guidance,
                                               noise_level, seed):
    ours = three_stage_pipe.generate(prompts, negative_prompt=negative, seed=seed, num_images_per_prompt=n,
                                     steps=STEPS, guidance=guidance, noise_level=noise_level, output_type="np")
    theirs = run_reference(reference3, prompts, seed, STEPS, guidance, n=n, negative=negative,
                           noise_level=noise_level)
    assert ours.shape == theirs.shape == (len(theirs), 128, 128, 3)
    assert ours.std() > 0.02  # a real picture of noise, not a constant
    assert np.abs(ours - theirs).max() <= 1e-4


def test_unguided_upscaler_runs_without_its_unconditional_half(three_stage_pipe, reference3):
    # Guidance 1 on the x4 stage only: CLIP encodes the prompt alone, T5 still encodes the empty prompt.
    calls = []
    encode = three_stage_pipe.stages[2].text.encode
    three_stage_pipe.stages[2].text.encode = lambda prompts: (calls.append(list(prompts)), encode(prompts))[1]
    try:
        ours = three_stage_pipe.generate("a cat", seed=2, steps=STEPS, guidance=(7.0, 4.0, 1.0), output_type="np")
    finally:
        three_stage_pipe.stages[2].text.encode = encode
    theirs = run_reference(reference3, "a cat", 2, STEPS, (7.0, 4.0, 1.0), noise_level=(250, 20))
    assert calls == [["a cat"]]
    assert np.abs(ours - theirs).max() <= 1e-4


def test_stage_kinds_sizes_and_defaults(three_stage_pipe):
    assert [s.kind for s in three_stage_pipe.stages] == ["base", "super_resolution", "latent_upscaler"]
    assert three_stage_pipe.image_size == 128
    x4 = GenerateRequest("a cat").per_stage([s.kind for s in three_stage_pipe.stages])[2]
    default = STAGE_DEFAULTS["latent_upscaler"]
    assert (x4.timesteps, x4.guidance, x4.noise_level) == (default.steps, default.guidance, default.noise_level)
    assert (x4.timesteps, x4.guidance, x4.noise_level) == (75, 9.0, 20)  # StableDiffusionUpscalePipeline's


def test_noise_level_above_the_upscalers_limit_is_refused_before_any_work(three_stage_pipe):
    with pytest.raises(InvalidRequestError, match="x4 upscaler.*0..350, got 400"):
        three_stage_pipe.generate("a cat", steps=STEPS, noise_level=(250, 400))
    with pytest.raises(InvalidRequestError, match="noise_level has 3 values but the cascade has 2 stages that take"):
        three_stage_pipe.generate("a cat", steps=STEPS, noise_level=(250, 20, 20))


def test_cli_writes_a_1024_style_png_from_three_stages(three_stage_dir, tmp_path):
    out = tmp_path / "up.png"
    code = main(["generate", "a red circle", "--model", str(three_stage_dir), "-o", str(out), "--steps", "3", "2",
                 "3", "--noise-level", "250", "20", "--quiet"])
    assert code == 0
    assert Image.open(out).size == (128, 128)


@pytest.fixture
def three_stage_copy(three_stage_dir, tmp_path):
    target = tmp_path / "cascade3"
    shutil.copytree(three_stage_dir, target)
    return target


def test_upscaler_listed_first_is_refused(three_stage_dir):
    with pytest.raises(ModelError, match="upscales the image of an earlier stage") as info:
        engine.load(three_stage_dir / "stage_III")
    assert info.value.path.endswith("stage_III")


def test_upscaler_unet_with_wrong_channels(three_stage_copy):
    config_file = three_stage_copy / "stage_III" / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["in_channels"] = 6
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="takes 6 channels; expected 7 \\(4 latent \\+ 3 image\\)"):
        engine.load(three_stage_copy)


def test_upscaler_missing_vae_weights(three_stage_copy):
    (three_stage_copy / "stage_III" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="no .safetensors weight files") as info:
        engine.load(three_stage_copy)
    assert info.value.path.endswith("stage_III/vae")


def test_upscaler_missing_low_res_scheduler_config(three_stage_copy):
    (three_stage_copy / "stage_III" / "low_res_scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelError, match="low-res noising scheduler config"):
        engine.load(three_stage_copy)
