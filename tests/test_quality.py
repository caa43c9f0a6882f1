"""The procedural captioned pictures and the analytic checker of the quality gate."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from engine.demo.checker import ASPECTS, frechet_distance, judge, read
from engine.demo.shapes import COLOURS, Scene, caption, parse_caption, random_scene, render


def fresh_rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)  # fresh renders every run; the seed is in the report
    return np.random.default_rng(seed), seed


def test_captions_follow_the_grammar_and_parse_back():
    assert caption(Scene("circle", "red", "blue", "large", "center")) == "a large red circle on a blue background"
    assert caption(Scene("triangle", "yellow", "black", "small", "top left")) == \
        "a small yellow triangle at the top left on a black background"
    rng, seed = fresh_rng()
    for _ in range(200):
        scene = random_scene(rng)
        assert parse_caption(caption(scene)) == scene, seed
        assert scene.colour != scene.background
    with pytest.raises(ValueError):
        parse_caption("a photo of a corgi")


def test_colour_words_have_the_stated_rgb_values():
    assert COLOURS == {"red": (230, 25, 25), "green": (25, 170, 25), "blue": (25, 60, 230),
                       "yellow": (240, 220, 30), "purple": (140, 40, 190), "orange": (245, 130, 30),
                       "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
    image = np.asarray(render(Scene("square", "purple", "orange", "large", "center"), 32))
    assert tuple(image[16, 16]) == COLOURS["purple"] and tuple(image[0, 0]) == COLOURS["orange"]
    with pytest.raises(ValueError, match="both red"):
        Scene("circle", "red", "red", "small", "center")


@pytest.mark.parametrize("size", [32, 128])
def test_checker_is_right_on_fresh_renders(size):
    rng, seed = fresh_rng()
    right = sum(judge(render(scene, size), scene)["all"] for scene in (random_scene(rng) for _ in range(300)))
    assert right / 300 >= 0.99, f"seed {seed}: {right}/300"


def test_checker_holds_up_under_blur_and_noise():
    rng, seed = fresh_rng()
    right = 0
    for _ in range(200):
        scene = random_scene(rng)
        pixels = np.asarray(render(scene, 32).filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float64)
        noisy = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        right += judge(Image.fromarray(noisy), scene)["all"]
    assert right / 200 >= 0.97, f"seed {seed}: {right}/200"


def test_checker_names_each_aspect_that_is_wrong():
    scene = Scene("circle", "red", "blue", "large", "top right")
    image = render(scene, 64)
    for aspect, other in [("shape", "square"), ("colour", "green"), ("background", "white"),
                          ("size", "small"), ("position", "bottom left")]:
        wrong = Scene(**{**scene.__dict__, aspect: other})
        verdict = judge(image, wrong)
        assert not verdict[aspect] and not verdict["all"]
        assert all(verdict[a] for a in ASPECTS if a != aspect)
    assert judge(np.asarray(image, dtype=np.float32) / 255, scene)["all"]  # [0, 1] arrays as output_type="np"


def test_a_plain_picture_shows_nothing():
    plain = Image.new("RGB", (32, 32), COLOURS["gray"])
    assert read(plain).scene is None
    assert not any(judge(plain, Scene("circle", "red", "gray", "small", "center")).values())


def test_frechet_distance_separates_renders_from_noise():
    rng, _ = fresh_rng()
    renders = [np.stack([read(render(random_scene(rng), 32)).features for _ in range(200)]) for _ in range(2)]
    noise = np.stack([read(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))).features
                      for _ in range(200)])
    same, apart = frechet_distance(*renders), frechet_distance(renders[0], noise)
    assert same < 0.1 < apart and same * 10 < apart


def test_eval_reports_adherence_and_distance(engine_pipe, tmp_path):
    import json

    from engine.cli import main
    from engine.demo.evaluate import EvalOptions, evaluate, held_out_scenes

    report = evaluate(engine_pipe, EvalOptions(count=4, batch=2), steps=(2, 2))
    assert report["count"] == 4 and 0.0 <= report["adherence"] <= 1.0
    assert set(report["aspects"]) == {"shape", "colour", "background", "size", "position", "all"}
    assert np.isfinite(report["frechet_distance"]) and report["frechet_distance"] > 0  # two steps: far off
    assert held_out_scenes(4) == held_out_scenes(4)  # the same captions for every backend and precision
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(engine_pipe.source), "--count", "2", "--batch", "2", "--steps", "1",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["count"] == 2
    assert main(["eval", "--model", str(engine_pipe.source), "--count", "1"]) == 2


# The gate on the packaged model at its default settings, on GATE_COUNT held-out captions: it scores about 95%
# adherence (bench/RESULTS.md, "Quality gate"; an untrained network scores 0%), so an optimisation that changes
# what the model draws fails here.
GATE_COUNT = 32
GATE_FLOOR = 0.85


def test_packaged_model_passes_the_quality_gate():
    import engine
    from engine.demo.evaluate import EvalOptions, evaluate, format_report

    report = evaluate(engine.load(engine.DEFAULT_MODEL, device="cpu"), EvalOptions(count=GATE_COUNT))
    assert report["adherence"] >= GATE_FLOOR, format_report(report)


def test_the_readme_prompt_draws_what_it_says():
    """The README's example: its picture must be what its caption says, judged by the checker."""
    import engine

    prompt = "a large green square on a white background"
    assert prompt in Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    for seed in range(3):
        image = engine.generate(prompt, seed=seed)[0]
        verdict = judge(image, parse_caption(prompt))
        assert verdict["all"], (seed, verdict)


# The presets the packaged model ships (cascade.json "presets"), each certified by the gate on 256 held-out
# captions (bench/RESULTS.md, "Presets"). A preset is offered only within PRESET_MARGIN of the defaults'
# adherence there, and each is checked here against its own floor on GATE_COUNT captions.
PRESET_MARGIN = 0.02


def _shipped_presets() -> dict:
    from engine.model_dir import PACKAGED_ROOT

    return json.loads((PACKAGED_ROOT / "shapes" / "cascade.json").read_text()).get("presets", {})


def test_shipped_presets_were_certified_within_the_margin_of_the_defaults():
    presets = _shipped_presets()
    assert presets, "the packaged model ships presets (README, Presets)"
    for name, preset in presets.items():
        certified = preset["certified"]
        assert certified["captions"] >= 256, name
        assert certified["adherence"] >= certified["default_adherence"] - PRESET_MARGIN, name
        assert 0 < certified["floor"] <= certified["adherence"], name


@pytest.mark.parametrize("name", sorted(_shipped_presets()))
def test_each_shipped_preset_passes_its_gate_floor(name):
    import engine
    from engine.demo.evaluate import EvalOptions, evaluate, format_report

    floor = _shipped_presets()[name]["certified"]["floor"]
    report = evaluate(engine.load(engine.DEFAULT_MODEL, device="cpu"), EvalOptions(count=GATE_COUNT), preset=name)
    assert report["adherence"] >= floor, f"{name}: {format_report(report)}"
