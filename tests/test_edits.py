"""Image-to-image and inpainting (image=, mask_image=, strength=) against diffusers' four IF edit pipelines
chained as their model card chains them (IFImg2ImgPipeline -> IFImg2ImgSuperResolutionPipeline, and the two
inpainting ones), over seeds and strengths; then the fast path, the step-level scheduler and ONNX Runtime
against the eager runtime, the stage-II-alone door, and the errors, which come before any model work."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import engine
from engine import GenerateRequest
from engine.errors import InvalidRequestError
from engine.images import edit_input
from engine.testing.reference import reference_edit, run_reference_edit, swap_scheduler
from tests.conftest import scheduled

PROMPT = "a red circle"
STEPS = (10, 8)
GUIDANCE = (7.0, 4.0)
BOUND = 1e-4  # the bound, float32 on CPU; measured: 0 (the same operations in the same order)


def picture(width: int = 40, height: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def left_half_mask(width: int = 40, height: int = 40) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255  # white: redrawn
    return Image.fromarray(mask)


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(autouse=True)
def quiet(engine_pipe):
    """The door's progress bars off here, and the session's pipe given back as it was."""
    engine_pipe.set_progress_bar_config(disable=True)
    yield
    engine_pipe.progress_bar_config.clear()


@pytest.fixture(scope="module")
def edit_pipes(reference):
    return {masked: reference_edit(reference, masked) for masked in (False, True)}


def ours(pipe, seed, strength, image, mask=None, **options):
    masked = {} if mask is None else {"mask_image": mask}
    return pipe(PROMPT, image=image, strength=strength, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=generator(seed), output_type="np", **masked, **options).images


@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "inpainting"])
@pytest.mark.parametrize("seed, strength", [(0, (0.7, 0.8)), (3, (1.0, 0.5)), (7, (0.35, 1.0)), (11, (0.55, 0.3))])
def test_edits_give_the_images_of_diffusers_edit_pipelines(engine_pipe, edit_pipes, masked, seed, strength):
    mask = left_half_mask() if masked else None
    theirs = run_reference_edit(edit_pipes[masked], PROMPT, picture(), seed, STEPS, GUIDANCE, strength, mask=mask)
    assert np.abs(ours(engine_pipe, seed, strength, picture(), mask) - theirs).max() <= BOUND


@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "inpainting"])
def test_a_picture_that_is_not_square_keeps_its_aspect_as_in_diffusers(engine_pipe, edit_pipes, masked):
    mask = left_half_mask(48, 30) if masked else None
    theirs = run_reference_edit(edit_pipes[masked], PROMPT, picture(48, 30), 5, STEPS, GUIDANCE, (0.7, 0.8),
                                mask=mask)
    found = ours(engine_pipe, 5, (0.7, 0.8), picture(48, 30), mask)
    assert found.shape == theirs.shape == (1, 32, 48, 3)  # the short side at each stage's size, as theirs
    assert np.abs(found - theirs).max() <= BOUND


def test_the_default_strengths_are_diffusers_and_several_prompts_and_images_each(engine_pipe, edit_pipes):
    prompts, pictures = ["a red circle", "a blue square"], [picture(seed=1), picture(seed=2)]
    pipe = engine_pipe
    found = pipe(prompts, image=pictures, num_inference_steps=STEPS, num_images_per_prompt=2,
                 generator=generator(4), output_type="np").images  # guidance: the model's defaults, GUIDANCE
    first, second = edit_pipes[False]
    generator_ = generator(4)
    embeds, negative = first.encode_prompt(prompts, num_images_per_prompt=2)  # 4 rows: each prompt twice
    per_image = [p for p in pictures for _ in range(2)]  # theirs take one picture per row
    low = first(image=per_image, prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generator_,
                num_inference_steps=STEPS[0], guidance_scale=GUIDANCE[0], output_type="pt").images
    theirs = second(image=low, original_image=per_image, prompt_embeds=embeds, negative_prompt_embeds=negative,
                    generator=generator_, num_inference_steps=STEPS[1], guidance_scale=GUIDANCE[1],
                    output_type="np").images
    assert found.shape == (4, 32, 32, 3) and np.abs(found - theirs).max() <= BOUND


def test_inpainting_keeps_the_picture_where_the_mask_is_black(engine_pipe):
    out = engine_pipe.generate(PROMPT, image=picture(), mask_image=left_half_mask(), strength=(1.0, 1.0), seed=2,
                               steps=(6, 5), output_type="np")
    kept, _ = edit_input(picture(), None).at(32)  # the picture as stage II sees it, (1, 3, 32, 32) in [-1, 1]
    kept = (kept / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(out[:, :, 16:], kept[:, :, 16:])  # exactly: every step takes the kept part back
    assert np.abs(out[:, :, :16] - kept[:, :, :16]).mean() > 0.05  # and the white half is redrawn


def test_dpm_solver_edits_start_first_order_as_diffusers_does(engine_pipe, edit_pipes):
    from diffusers import DPMSolverMultistepScheduler

    pipes = edit_pipes[False]
    saved = [p.scheduler for p in pipes]
    for pipe in pipes:
        pipe.scheduler = swap_scheduler(pipe.scheduler, DPMSolverMultistepScheduler)
    try:
        theirs = run_reference_edit(pipes, PROMPT, picture(), 1, STEPS, GUIDANCE, (0.6, 0.7))
    finally:
        for pipe, scheduler in zip(pipes, saved):
            pipe.scheduler = scheduler
    assert np.abs(ours(engine_pipe, 1, (0.6, 0.7), picture(), scheduler="dpm++2m") - theirs).max() <= BOUND


def test_a_super_resolution_stage_alone_edits_its_original_image_as_diffusers_does(cascade_dir, edit_pipes):
    """IFImg2ImgSuperResolutionPipeline's call: image= the low-res input, original_image= the picture."""
    stage_2 = engine.load(cascade_dir / "stage_II")
    stage_2.set_progress_bar_config(disable=True)
    first, second = edit_pipes[True]
    embeds, negative = first.encode_prompt(PROMPT)
    low = torch.rand(1, 3, 16, 16, generator=generator(9)) * 2 - 1
    options = dict(image=low, original_image=picture(), mask_image=left_half_mask(), prompt_embeds=embeds,
                   negative_prompt_embeds=negative, num_inference_steps=6, strength=0.6, noise_level=100,
                   output_type="pt")
    found = stage_2(generator=generator(3), **options).images
    theirs = second(generator=generator(3), **options).images
    assert (found - theirs).abs().max() <= BOUND
    with pytest.raises(InvalidRequestError, match="strength is for edits.*original_image="):
        stage_2(image=low, prompt_embeds=embeds, negative_prompt_embeds=negative, strength=0.5)


def test_the_fast_path_and_the_scheduler_agree_with_the_eager_runtime(cascade_dir, engine_pipe):
    fast = engine.load(cascade_dir, fast=True)
    for stage in fast.stages:
        stage.unet.compile = False  # the runner and its buffers; compiling is tested in test_fast.py
    edits = [dict(image=picture(), strength=(0.6, 0.5), seed=1),
             dict(image=picture(48, 30), mask_image=left_half_mask(48, 30), seed=2),
             dict(image=picture(seed=3), mask_image=left_half_mask(), strength=0.9, seed=3, num_images_per_prompt=2)]
    plain = dict(seed=4)
    requests = [GenerateRequest(PROMPT, steps=(5, 4), output_type="np", **options) for options in edits + [plain]]
    eager = [engine_pipe.run(request).images for request in requests]
    for request, expected in zip(requests, eager):
        assert np.abs(fast.run(request).images - expected).max() <= 1e-4  # channels_last rounding (test_fast.py)
    # every request at once: edits and text-to-image share U-Net calls
    for images, expected in zip(scheduled(engine_pipe, requests), eager):
        assert np.abs(images - expected).max() <= 1e-5


def test_onnxruntime_agrees_and_refuses_what_its_export_cannot_take(cascade_dir, engine_pipe, tmp_path):
    from export.onnx import export_onnx

    ort_pipe = engine.load(export_onnx(cascade_dir, out=tmp_path / "onnx", progress=False))
    options = dict(image=picture(), mask_image=left_half_mask(), strength=(0.8, 0.6), seed=5, steps=(4, 3),
                   output_type="np")
    assert np.abs(ort_pipe.generate(PROMPT, **options) - engine_pipe.generate(PROMPT, **options)).max() <= 1e-3
    with pytest.raises(InvalidRequestError, match="export built for 16x16 samples.*sized 24x16.*square picture"):
        ort_pipe.generate(PROMPT, image=picture(48, 30))


@pytest.mark.parametrize("options, message", [
    (dict(image=picture(), strength=0), "strength must be a number in \\(0, 1\\]"),
    (dict(image=picture(), strength=1.5), "strength must be a number in \\(0, 1\\]"),
    (dict(image=picture(), strength=True), "strength must be a number"),
    (dict(mask_image=left_half_mask()), "mask_image is for edits: give image= too"),
    (dict(strength=0.5), "strength is for edits: give image= too"),
    (dict(image=picture(), mask_image=left_half_mask(20, 20)), "mask_image is 20x20 but image is 40x40"),
    (dict(image=picture(), mask_image=np.full((40, 40), 2.0)), "mask_image values must be finite and in \\[0, 1\\]"),
    (dict(image=picture(), mask_image="mask.png"), "mask_image must be a PIL image"),
    (dict(image=picture(), mask_image=np.zeros((2, 3, 40, 40))), "mask_image must be \\(H, W\\)"),
])
def test_bad_edits_are_refused_by_the_request(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerateRequest(PROMPT, **options)


@pytest.mark.parametrize("options, message", [
    (dict(image=[picture()] * 2), "got 2 images for 3 prompts"),
    (dict(image=picture(), mask_image=[left_half_mask()] * 2), "got 2 mask_images for 3 prompts"),
    (dict(image=picture(), strength=(0.5, 0.5, 0.5)), "strength has 3 values but the cascade has 2 stages that edit"),
    (dict(image=picture(), strength=0.05, steps=10), "strength 0.05 of stage_I's 10 steps runs none"),
    (dict(image=picture(200, 40)), "image is 200x40; an edit keeps the picture's aspect, at most 4:1"),
    (dict(image=picture(), original_image=picture()), "original_image= is for a cascade that starts with a "
                                                      "super-resolution stage.*image= is the picture to edit"),
])
def test_edits_the_cascade_cannot_run_are_refused_before_any_model_work(engine_pipe, options, message,
                                                                          monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the text encoder ran before the request was checked")

    monkeypatch.setattr(engine_pipe.text, "encode", no_model_work)
    with pytest.raises(InvalidRequestError, match=message):
        engine_pipe.generate(["a", "b", "c"], **options)


def test_the_command_line_edits_a_picture_file(cascade_dir, engine_pipe, tmp_path, capsys):
    from engine.cli import main

    picture().save(tmp_path / "in.png")
    left_half_mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--model", str(cascade_dir), "--image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--strength", "0.9", "0.7", "--steps", "5", "4",
                 "--seed", "6", "-o", str(out), "--quiet"]) == 0
    expected = engine_pipe.generate("a red circle", image=picture(), mask_image=left_half_mask(), strength=(0.9, 0.7),
                                    steps=(5, 4), seed=6)[0]
    written = Image.open(out)
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))
    assert written.text["strength"] == "0.9 0.7" and written.text["mask"] == str(tmp_path / "mask.png")
    assert main(["generate", "a red circle", "--model", str(cascade_dir), "--mask", str(tmp_path / "mask.png"),
                 "-o", str(out)]) == 2
    assert "mask_image is for edits" in capsys.readouterr().err
    assert main(["generate", "a red circle", "--model", str(cascade_dir), "--image", str(tmp_path / "none.png"),
                 "-o", str(out)]) == 2
    assert "cannot read --image" in capsys.readouterr().err


def test_batch_rows_edit_pictures_inside_the_input_folder_only(engine_pipe, tmp_path):
    from engine.offline import batch

    jobs = tmp_path / "jobs"
    (jobs / "pictures").mkdir(parents=True)
    picture().save(jobs / "pictures" / "in.png")
    left_half_mask().save(jobs / "pictures" / "mask.png")
    picture(seed=9).save(tmp_path / "secret.png")  # beside the folder: no row may read it
    (jobs / "pictures" / "link.png").symlink_to(tmp_path / "secret.png")
    rows = [{"prompt": "a red circle", "image": "pictures/in.png", "mask": "pictures/mask.png", "strength": [0.9, 0.7],
             "seed": 3, "steps": [4, 3]},
            {"prompt": "a red circle", "image": "pictures/in.png", "seed": 4, "steps": [4, 3]},
            {"prompt": "x", "image": "../secret.png"},
            {"prompt": "x", "image": str(tmp_path / "secret.png")},
            {"prompt": "x", "image": "pictures/link.png"},
            {"prompt": "x", "image": "pictures/none.png"},
            {"prompt": "x", "mask": "pictures/mask.png"}]
    (jobs / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = batch(jobs / "rows.jsonl", tmp_path / "out", model=engine_pipe, progress=False)
    assert summary.images_written == 2
    reasons = {bad.line: bad.reason for bad in summary.bad_rows}
    assert all("is outside the input's folder" in reasons[line] for line in (3, 4, 5))
    assert "cannot read image 'pictures/none.png'" in reasons[6] and "mask_image is for edits" in reasons[7]
    entries = {e["row"]: e for e in (json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").open())}
    expected = engine_pipe.generate("a red circle", image=picture(), mask_image=left_half_mask(),
                                    strength=(0.9, 0.7), steps=(4, 3), seed=3)[0]
    made = Image.open(tmp_path / "out" / entries[1]["file"])
    # Batched with row 2 in one U-Net call, where generate() ran it alone: CPU kernels' last bits may move a pixel
    # by one level (README, batch jobs); a wrong edit input moves it by far more
    difference = np.abs(np.asarray(made.convert("RGB"), dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 1, difference.max()
    assert entries[1]["request"]["strength"] == [0.9, 0.7] and entries[1]["input"]["mask"] == "pictures/mask.png"
    assert entries[2]["stages"]["stage_I"]["strength"] == 0.7  # diffusers' default, as it ran


def test_diffusers_edit_classes_chain_as_theirs_do(cascade_dir, edit_pipes):
    """IFInpaintingPipeline -> IFInpaintingSuperResolutionPipeline from engine.diffusers, as diffusers' docs chain
    them: stage I's encode_prompt, its output_type="pt" output as stage II's image=, the picture as original_image=."""
    from engine.diffusers import IFImg2ImgPipeline, IFInpaintingPipeline, IFInpaintingSuperResolutionPipeline

    stage_1 = IFInpaintingPipeline.from_pretrained(cascade_dir / "stage_I")
    stage_2 = IFInpaintingSuperResolutionPipeline.from_pretrained(cascade_dir / "stage_II", text_encoder=None)
    assert IFImg2ImgPipeline.from_pipe(stage_1) is stage_1
    with pytest.raises(InvalidRequestError, match="runs a base stage; this pipeline starts with super_resolution"):
        IFImg2ImgPipeline.from_pipe(stage_2)
    embeds, negative = stage_1.encode_prompt(PROMPT)
    g = generator(8)
    common = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=g, mask_image=left_half_mask())
    low = stage_1(image=picture(), strength=0.8, num_inference_steps=STEPS[0], output_type="pt", **common).images
    ours_ = stage_2(image=low, original_image=picture(), strength=0.6, num_inference_steps=STEPS[1], noise_level=250,
                    output_type="np", **{**common, "generator": g}).images
    theirs = run_reference_edit(edit_pipes[True], PROMPT, picture(), 8, STEPS, GUIDANCE, (0.8, 0.6),
                                mask=left_half_mask())
    assert np.abs(ours_ - theirs).max() <= BOUND


def test_engine_generate_edits_with_the_packaged_model():
    source = engine.generate("a large red circle on a blue background", seed=0, steps=(6, 4))[0]
    edited = engine.generate("a large green circle on a blue background", image=source, strength=0.6, seed=1,
                             steps=(6, 4), output_type="np")
    assert edited.shape == (1, 128, 128, 3)
    with pytest.raises(InvalidRequestError, match="strength must be a number in \\(0, 1\\]"):
        engine.generate("a large red circle", image=source, strength=-1)


def test_the_edit_example_runs(tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "edit_picture.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(tmp_path / "sheet.png")])
    runpy.run_path(str(script), run_name="__main__")
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (4 * 128, 128)  # picture, mask, inpainted, image-to-image


def test_a_list_of_generators_draws_each_images_edit_from_its_own(engine_pipe, edit_pipes):
    generators = lambda: [generator(5), generator(6)]  # noqa: E731  one per image, as diffusers takes them
    pictures = [picture(seed=1), picture(seed=2)]
    found = engine_pipe(["a red circle", "a blue square"], image=pictures, mask_image=left_half_mask(),
                        strength=(0.8, 0.6), num_inference_steps=(6, 5), generator=generators(),
                        output_type="np").images
    first, second = edit_pipes[True]
    shared = generators()
    embeds, negative = first.encode_prompt(["a red circle", "a blue square"])
    common = dict(mask_image=left_half_mask(), prompt_embeds=embeds, negative_prompt_embeds=negative, generator=shared)
    low = first(image=pictures, strength=0.8, num_inference_steps=6, guidance_scale=7.0, output_type="pt",
                **common).images
    theirs = second(image=low, original_image=pictures, strength=0.6, num_inference_steps=5, noise_level=250,
                    output_type="np", **common).images
    assert np.abs(found - theirs).max() <= BOUND
