"""Stage III, the x4 latent upscaler: same images as diffusers' three pipelines in a row, its defaults, its
limits and its loading errors."""

import json

import numpy as np
import pytest
from PIL import Image

import engine
from engine import InvalidRequestError, ModelError
from engine.cli import main
from engine.options import STAGE_DEFAULTS, GenerateRequest
from engine.testing.reference import reference_cascade, run_reference

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
    x4 = GenerateRequest("a cat").per_stage([s.defaults for s in three_stage_pipe.stages])[2]
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


def test_cli_upscales_a_png_with_the_upscaler_alone(three_stage_dir, tmp_path):
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    _pictures(1, (20, 16))[0].save(source)
    assert main(["generate", "a cat", "--model", str(three_stage_dir / "stage_III"), "--image", str(source),
                 "-o", str(out), "--steps", "2", "--quiet"]) == 0
    assert Image.open(out).size == (80, 64)
    assert main(["generate", "a cat", "--model", str(three_stage_dir / "stage_III"), "--image",
                 str(tmp_path / "missing.png"), "-o", str(out), "--quiet"]) == 2




def test_upscaler_before_other_stages_is_refused(three_stage_dir):
    with pytest.raises(ModelError, match="is the last stage of a cascade") as info:
        engine.load(three_stage_dir / "stage_III", three_stage_dir / "stage_II")
    assert info.value.path.endswith("stage_III")


def _pictures(count, size=(32, 24), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def test_upscaler_alone_upscales_the_given_images_as_diffusers_does(three_stage_dir):
    import torch

    from engine.testing.reference import reference_upscaler

    pipe = engine.load(three_stage_dir / "stage_III", device="cpu")
    assert [s.kind for s in pipe.stages] == ["latent_upscaler"]
    images = _pictures(2)
    prompts = ["a red circle", "a cat"]
    ours = pipe.generate(prompts, image=images, seed=5, steps=4, guidance=6.0, noise_level=30, output_type="np")
    reference = reference_upscaler(three_stage_dir / "stage_III")
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt=prompts, image=images, generator=torch.Generator("cpu").manual_seed(5),
                       num_inference_steps=4, guidance_scale=6.0, noise_level=30, output_type="np").images
    assert ours.shape == theirs.shape == (2, 96, 128, 3)
    assert np.abs(ours - theirs).max() <= 1e-4
    # The engine's own output goes straight back in: [0, 1] arrays and tensors are accepted.
    again = pipe.generate("a cat", image=ours[1][::4, ::4], steps=2, output_type="pt")
    assert again.shape == (1, 3, 96, 128)


@pytest.mark.parametrize("image, message", [
    ("a picture", "image must be a PIL image"),
    (np.full((8, 8, 3), 2.0), "in \\[0, 1\\]"),
    (np.zeros((8, 8)), "must be \\(H, W, 3\\)"),
    (_pictures(1, (8, 8)) + _pictures(1, (16, 8)), "must share one size"),
])
def test_bad_images_are_refused_before_any_work(image, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerateRequest("a cat", image=image)


def test_image_where_it_does_not_belong_or_missing(three_stage_dir):
    alone = engine.load(three_stage_dir / "stage_III", device="cpu")
    with pytest.raises(InvalidRequestError, match="upscales an image: pass image="):
        alone.generate("a cat", steps=2)
    with pytest.raises(InvalidRequestError, match="got 1 images for 2 prompts"):
        alone.generate(["a cat", "a dog"], image=_pictures(1), steps=2)
    with pytest.raises(InvalidRequestError, match="multiples of 2, got \\(9, 12\\)"):
        alone.generate("a cat", image=_pictures(1, (12, 9)), steps=2)
    with pytest.raises(InvalidRequestError, match="original_image= is for a cascade that starts with a "
                                                  "super-resolution stage.*it upscales, and does not edit"):
        alone.generate("a cat", image=_pictures(1), original_image=_pictures(1), steps=2)


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
