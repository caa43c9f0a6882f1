"""A diffusers user's code runs as written: pipe(prompt, num_inference_steps=, guidance_scale=, generator=, ...)
gives diffusers' images and an object with .images; misspelt names get the nearest one; seeds are fresh per call
unless given, and reported."""

import numpy as np
import pytest
import torch

import engine
from engine import InvalidRequestError
from engine.options import GenerateRequest
from tests.conftest import diffusers_cascade

TOLERANCE = 1e-4


def test_diffusers_names_and_a_generator_give_diffusers_images(engine_pipe, reference):
    out = engine_pipe("a red circle", num_inference_steps=(3, 2), guidance_scale=(6.0, 3.0),
                      generator=torch.Generator("cpu").manual_seed(21), output_type="np")
    theirs = diffusers_cascade(reference, "a red circle", 21, (3, 2), (6.0, 3.0))
    assert np.abs(out.images - theirs).max() <= TOLERANCE
    assert out.seed is None and set(out.timings) == {"text", "stage_I", "stage_II"}
    assert out.nsfw_detected is None and out.watermark_detected is None


def test_timesteps_negative_prompt_and_noise_level(engine_pipe, reference):
    ts = ([999, 749, 499, 249], [999, 666, 333])
    out = engine_pipe(["a cat", "a dog"], timesteps=ts, num_inference_steps=100, guidance_scale=5.0,
                      negative_prompt="blue", noise_level=120, generator=torch.Generator("cpu").manual_seed(4),
                      output_type="np")
    theirs = diffusers_cascade(reference, ["a cat", "a dog"], 4, ts, (5.0, 5.0), negative=["blue"] * 2,
                               noise_level=120)
    assert out.images.shape == (2, 32, 32, 3)
    assert np.abs(out.images - theirs).max() <= TOLERANCE  # timesteps won over num_inference_steps, as in diffusers


def test_cached_prompt_embeddings(engine_pipe, reference):
    embeds, negative = reference[0].encode_prompt("a green star", do_classifier_free_guidance=True,
                                                  negative_prompt="red")
    out = engine_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=(2, 2),
                      guidance_scale=(4.0, 2.0), generator=torch.Generator("cpu").manual_seed(8), output_type="np")
    theirs = diffusers_cascade(reference, "a green star", 8, (2, 2), (4.0, 2.0), negative="red")
    assert np.abs(out.images - theirs).max() <= TOLERANCE
    by_prompt = engine_pipe.generate("a green star", negative_prompt="red", seed=8, steps=(2, 2),
                                     guidance=(4.0, 2.0), output_type="np")
    assert np.abs(out.images - by_prompt).max() <= TOLERANCE


def test_prompt_embeddings_that_do_not_fit_are_refused(engine_pipe):
    with pytest.raises(InvalidRequestError, match="48 wide but this model's text encoder gives 32"):
        engine_pipe(prompt_embeds=torch.zeros(1, 77, 48), num_inference_steps=1)
    with pytest.raises(InvalidRequestError, match="prompt or prompt_embeds, not both"):
        engine_pipe("a cat", prompt_embeds=torch.zeros(1, 77, 32))
    with pytest.raises(InvalidRequestError, match="must match"):
        engine_pipe(prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(2, 77, 32))


@pytest.mark.parametrize("name, message", [
    ("num_inference_step", "unknown argument 'num_inference_step'; did you mean 'num_inference_steps'\\?"),
    ("guidance_scal", "did you mean 'guidance_scale'\\?"),
    ("sead", "did you mean 'seed'\\?"),
    ("zzz", "unknown argument 'zzz'; known: "),
    ("height", "diffusers' height= is not supported: the image size is the model's own"),
    ("callback", "give on_step=fn"),
])
def test_unknown_and_unsupported_arguments_name_the_fix(engine_pipe, name, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine_pipe("a cat", **{name: 3})
    with pytest.raises(InvalidRequestError, match=message):
        engine.generate("a cat", **{name: 3})


def test_an_argument_and_its_diffusers_twin_together_are_refused(engine_pipe):
    with pytest.raises(InvalidRequestError, match="steps= and num_inference_steps= say the same thing"):
        engine_pipe("a cat", steps=2, num_inference_steps=3)


@pytest.mark.parametrize("generator, seed, message", [
    ([torch.Generator("cpu")] * 2, None, "a list of 2 but the request makes 1 image"),
    ([torch.Generator("cpu"), "7"], None, "must be a torch.Generator"),
    (np.random.default_rng(0), None, "must be a torch.Generator"),
    (torch.Generator("cpu"), 3, "seed= or generator=, not both"),
])
def test_bad_generators_are_refused(generator, seed, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerateRequest("a cat", generator=generator, seed=seed, num_images_per_prompt=1 if message[0] == "a" else 2)


def test_no_seed_draws_a_fresh_one_and_reports_it(engine_pipe):
    args = dict(steps=(2, 1), output_type="np")
    first, second = engine_pipe("a cat", **args), engine_pipe("a cat", num_images_per_prompt=2, **args)
    assert first.seed != second.seed and not np.array_equal(first.images, second.images[:1])
    again = engine_pipe.generate("a cat", seed=first.seed, **args)
    assert np.array_equal(again, first.images)
    assert GenerateRequest("a cat").seed != GenerateRequest("a cat").seed
    assert GenerateRequest("a cat", seed=0).seed == 0  # seed 0 is a seed


def test_on_step_reports_every_step_of_every_stage(engine_pipe):
    seen = []
    engine_pipe.generate("a cat", seed=0, steps=(3, 2), on_step=lambda *a: seen.append(a))
    assert seen == [("stage_I", 1, 3), ("stage_I", 2, 3), ("stage_I", 3, 3), ("stage_II", 1, 2), ("stage_II", 2, 2)]


def test_load_takes_diffusers_names(cascade_dir):
    pipe = engine.load(cascade_dir, device="cpu", torch_dtype=torch.float32)
    assert pipe.dtype == torch.float32
    with pytest.raises(InvalidRequestError, match="not both"):
        engine.load(cascade_dir, dtype="float32", torch_dtype=torch.float32)
    with pytest.raises(InvalidRequestError, match="did you mean 'torch_dtype'"):
        engine.load(cascade_dir, torch_dtpye=torch.float32)


def test_half_precision_on_cpu_warns_with_the_reason(cascade_dir):
    with pytest.warns(UserWarning, match="bfloat16 on CPU runs about 15x slower than float32"):
        engine.load(cascade_dir, device="cpu", dtype="bfloat16")


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_the_output_indexes_and_return_dict_false_gives_the_tuple_as_in_diffusers(engine_pipe):
    out = engine_pipe("a red circle", num_inference_steps=(2, 2), generator=generator(1), output_type="np")
    assert out[0] is out.images and out["images"] is out.images and out.to_tuple() == (out.images,)
    with pytest.raises(IndexError):
        out[1]  # diffusers' outputs index their fields that are not None: the images only
    with pytest.raises(KeyError):
        out["nsfw_detected"]
    images, nsfw, watermark = engine_pipe("a red circle", num_inference_steps=(2, 2), generator=generator(1),
                                          output_type="np", return_dict=False)
    assert np.array_equal(images, out.images) and nsfw is None and watermark is None


def test_output_type_pt_through_the_door_is_the_unscaled_output_as_diffusers_gives_it(engine_pipe, reference):
    from engine.testing.reference import run_reference

    ours = engine_pipe("a red circle", num_inference_steps=(3, 2), guidance_scale=(6.0, 3.0), generator=generator(5),
                       output_type="pt").images
    theirs = run_reference(reference, "a red circle", 5, (3, 2), (6.0, 3.0), output_type="pt")
    assert ours.shape == theirs.shape and (ours.float() - theirs.float()).abs().max() <= TOLERANCE
    scaled = engine_pipe.generate("a red circle", steps=(3, 2), guidance=(6.0, 3.0), generator=generator(5),
                                  output_type="pt")  # the engine's own call keeps [0, 1]
    assert torch.allclose(scaled, (ours / 2 + 0.5).clamp(0, 1))


def test_encode_prompt_gives_what_prompt_embeds_takes_as_diffusers_does(engine_pipe, reference):
    ours = engine_pipe.encode_prompt("a green star", negative_prompt="red", num_images_per_prompt=2)
    theirs = reference[0].encode_prompt("a green star", do_classifier_free_guidance=True, negative_prompt="red",
                                        num_images_per_prompt=2)
    for mine, other in zip(ours, theirs):
        assert mine.shape == other.shape and (mine - other).abs().max() <= 1e-5
    embeds, negative = engine_pipe.encode_prompt(["a cat", "a dog"])  # no negative prompt: the empty one
    theirs = reference[0].encode_prompt(["a cat", "a dog"], do_classifier_free_guidance=True)
    assert (negative - theirs[1]).abs().max() <= 1e-5
    cached = engine_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=(2, 2),
                         generator=generator(3), output_type="np").images
    direct = engine_pipe(["a cat", "a dog"], num_inference_steps=(2, 2), generator=generator(3), output_type="np").images
    assert np.abs(cached - direct).max() <= 1e-5
    assert engine_pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[1] is None
    with pytest.raises(InvalidRequestError, match="clean_caption"):
        engine_pipe.encode_prompt("a cat", clean_caption=True)


def test_progress_bars_show_per_stage_unless_disabled(engine_pipe, capfd):
    engine_pipe("a red circle", num_inference_steps=(2, 2), generator=generator(0))
    assert "stage_I" in capfd.readouterr().err  # as diffusers' pipelines, a bar per stage by default
    engine_pipe.set_progress_bar_config(disable=True)
    try:
        engine_pipe("a red circle", num_inference_steps=(2, 2), generator=generator(0))
        assert "stage_I" not in capfd.readouterr().err
        engine_pipe.generate("a red circle", steps=(2, 2), seed=0)  # the engine's own call shows none
        assert "stage_I" not in capfd.readouterr().err
    finally:
        engine_pipe.progress_bar_config.clear()


def test_components_name_the_parts_as_diffusers_does(engine_pipe):
    parts = engine_pipe.components
    assert parts["text_encoder"] is engine_pipe.text.model and parts["tokenizer"] is engine_pipe.text.tokenizer
    assert parts["stage_I.unet"] is engine_pipe.stages[0].unet and "stage_II.scheduler" in parts
    assert parts["safety_checker"] is None and parts["watermarker"] is None


def test_a_list_of_generators_draws_each_image_from_its_own_as_diffusers_does(engine_pipe, reference):
    """diffusers takes one generator per image (prompts x n): image i draws all its noise from generator i."""
    from engine.testing.reference import run_reference

    def generators():
        return [torch.Generator("cpu").manual_seed(seed) for seed in (11, 12, 13, 14)]

    ours = engine_pipe(["a cat", "a dog"], num_images_per_prompt=2, num_inference_steps=(4, 3),
                       generator=generators(), output_type="np").images
    theirs = run_reference(reference, ["a cat", "a dog"], generators(), (4, 3), (7.0, 4.0), n=2)
    assert np.abs(ours - theirs).max() <= 1e-6
    alone = engine_pipe("a dog", num_inference_steps=(4, 3), generator=[torch.Generator("cpu").manual_seed(13)],
                        output_type="np").images  # image 2's generator alone draws image 2
    assert np.abs(alone[0] - ours[2]).max() <= 1e-5  # (in another batch: CPU kernels' last bits may move)


def test_to_moves_the_pipeline_in_place_as_diffusers_does(cascade_dir):
    pipe = engine.load(cascade_dir)
    pipe.add_preset("mine", [{"steps": 2}, {"steps": 2}])
    assert pipe.to("cpu") is pipe and pipe.to(torch.float32) is pipe and pipe.dtype == torch.float32
    with pytest.warns(UserWarning, match="bfloat16 on CPU"):
        assert pipe.to("cpu", torch.bfloat16) is pipe
    assert pipe.dtype == torch.bfloat16 and pipe.stages[1].dtype == torch.bfloat16 and "mine" in pipe.presets
    with pytest.warns(UserWarning):
        direct = engine.load(cascade_dir, dtype="bfloat16")
    moved = pipe.generate("a cat", seed=1, preset="mine", output_type="np")
    assert np.array_equal(moved, direct.generate("a cat", seed=1, steps=(2, 2), output_type="np"))
    pipe.to(dtype=torch.float32)
    assert np.array_equal(pipe.generate("a cat", seed=1, preset="mine", output_type="np"),
                          engine.load(cascade_dir).generate("a cat", seed=1, steps=(2, 2), output_type="np"))
    with pytest.raises(InvalidRequestError, match="takes a device and a dtype"):
        pipe.to(3)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError, match="no CUDA GPU"):
            pipe.to("cuda")
        assert pipe.device == torch.device("cpu")  # left as it was


@pytest.mark.parametrize("method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_offload_on_the_cpu_has_nothing_to_do(engine_pipe, method):
    """On a GPU these install engine/offload.py's offload in place (tests/test_offload.py, tests/test_gpu.py)."""
    getattr(engine_pipe, method)()  # the models are in host memory already
    assert engine_pipe.offloader is None
    assert engine_pipe("a cat", num_inference_steps=(2, 2), generator=generator(0)).images


def test_a_super_resolution_stage_alone_chains_as_diffusers_pipelines_do(cascade_dir, engine_pipe, reference):
    """The DeepFloyd model card's chain: stage I's encode_prompt, stage I with output_type="pt", its output
    (about [-1, 1], unclamped) as stage II's image=, the same generator through both. Stage II is loaded alone
    and has no text encoder (as diffusers loads IF-II with text_encoder=None): prompt_embeds only."""
    from engine.testing.reference import run_reference

    stage_1, stage_2 = engine.load(cascade_dir / "stage_I"), engine.load(cascade_dir / "stage_II")
    assert [s.kind for s in stage_2.stages] == ["super_resolution"]
    embeds, negative = stage_1.encode_prompt("a red circle")
    g = generator(7)
    low = stage_1(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=g, num_inference_steps=4,
                  output_type="pt").images
    high = stage_2(image=low, prompt_embeds=embeds, negative_prompt_embeds=negative, generator=g,
                   num_inference_steps=3, output_type="pt").images
    theirs = run_reference(reference, "a red circle", 7, (4, 3), (7.0, 4.0), output_type="pt")
    assert (high - theirs).abs().max() <= 1e-6
    cascade = engine_pipe("a red circle", num_inference_steps=(4, 3), generator=generator(7), output_type="pt")
    assert (high - cascade.images).abs().max() <= 1e-6  # the chain is the cascade
    with pytest.raises(InvalidRequestError, match="without a text encoder.*prompt_embeds"):
        stage_2("a red circle", image=low, num_inference_steps=2)
    with pytest.raises(InvalidRequestError, match="negative_prompt_embeds"):
        stage_2(image=low, prompt_embeds=embeds, num_inference_steps=2)
    with pytest.raises(InvalidRequestError, match="upscales an image: pass image="):
        stage_2(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2)
    alone = stage_2.generate(image=(low / 2 + 0.5).clamp(0, 1), prompt_embeds=embeds, negative_prompt_embeds=negative,
                             steps=2, seed=1, output_type="np")  # the engine's own call: [0, 1] images
    assert alone.shape == (1, 32, 32, 3)


def test_deepfloyds_model_card_runs_with_its_imports_changed(three_stage_dir, tmp_path):
    """examples/deepfloyd_model_card.py (the card's code, imports changed) on tiny weights published in a
    Hugging Face cache tree: three pipelines chained with one generator give the three-stage cascade's images."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from engine.testing.published_layouts import publish_if_cascade, publish_x4_upscaler, write_hub_cache

    published = tmp_path / "published"
    shutil.copytree(three_stage_dir, published)
    publish_if_cascade(published)
    publish_x4_upscaler(published / "stage_III")
    cache = tmp_path / "hub"
    for repo, stage in (("DeepFloyd/IF-I-XL-v1.0", "stage_I"), ("DeepFloyd/IF-II-L-v1.0", "stage_II"),
                        ("stabilityai/stable-diffusion-x4-upscaler", "stage_III")):
        write_hub_cache(cache, repo, published / stage)
    script = Path(__file__).resolve().parents[1] / "examples" / "deepfloyd_model_card.py"
    run = tmp_path / "run"
    run.mkdir()
    done = subprocess.run([sys.executable, str(script)], cwd=run, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = [Image.open(run / f"if_stage_{n}.png").size for n in ("I", "II", "III")]
    assert sizes == [(16, 16), (32, 32), (128, 128)]
    with pytest.warns(UserWarning, match="float16 on CPU"):
        cascade = engine.load(published, torch_dtype=torch.float16)
    prompt = ('a photo of a kangaroo wearing an orange hoodie and blue sunglasses standing in front of the eiffel '
              'tower holding a sign that says "very deep learning"')
    ours = cascade(prompt, generator=torch.manual_seed(0), noise_level=(250, 100), output_type="np").images[0]
    chained = np.asarray(Image.open(run / "if_stage_III.png").convert("RGB"), dtype=np.int16)
    assert np.abs(chained - np.round(ours * 255).astype(np.int16)).max() <= 1
