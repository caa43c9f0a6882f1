"""`python -m engine eval`: how well a model draws what the prompt says, judged by engine/demo/checker.py.

It generates one picture per held-out caption of the shapes grammar (a fixed, seeded set), and reports:
- prompt adherence: the share of pictures whose shape, colour, background, size and position all match,
  and the share right on each aspect;
- the Fréchet distance between the checker's features of the generated pictures and of true renders of the
  same captions (0 for perfect pictures; grows as they stray).
Every backend and precision can be compared on the same captions and seeds (`--backend`, `--dtype`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.demo.checker import ASPECTS, frechet_distance, judge, read
from engine.errors import InvalidRequestError
from engine.images import contact_sheet
from engine.demo.shapes import caption, random_scene, render

HELD_OUT_SEED = 20261122  # the evaluation's scenes; training draws from other seeds and skips these captions


@dataclass(frozen=True)
class EvalOptions:
    """One source of the eval command's defaults."""

    count: int = 64  # pictures (captions)
    batch: int = 8  # captions per generate call
    seed: int = 0  # the generation seed of the first batch (batch k uses seed + k)


def held_out_scenes(count: int):
    rng = np.random.default_rng(HELD_OUT_SEED)
    return [random_scene(rng) for _ in range(count)]


def evaluate(pipe, options: EvalOptions = EvalOptions(), progress: bool = False, sheet=None,
             **generate_options) -> dict:
    """Adherence and distance of `pipe` on `options.count` held-out captions; generate_options go to generate.

    progress: a bar over the pictures. sheet: a path to write a contact sheet of them to, wrong ones marked."""
    from tqdm.auto import tqdm

    if options.count < 2 or options.batch < 1:
        raise InvalidRequestError(f"eval needs count >= 2 (for a distance) and batch >= 1, got {options.count} "
                                  f"and {options.batch}")
    scenes = held_out_scenes(options.count)
    verdicts, generated, real, pictures = [], [], [], []
    start = time.perf_counter()
    bar = tqdm(total=len(scenes), desc="eval", unit="image", disable=not progress)
    for k in range(0, len(scenes), options.batch):
        chunk = scenes[k:k + options.batch]
        images = pipe.generate([caption(s) for s in chunk], seed=options.seed + k // options.batch,
                               output_type="np", **generate_options)  # (B, H, W, 3) in [0, 1]
        for scene, image in zip(chunk, images):
            verdicts.append(judge(image, scene))
            generated.append(read(image).features)
            real.append(read(render(scene, image.shape[0])).features)
            if sheet is not None:
                pictures.append(Image.fromarray((image * 255).round().astype(np.uint8)))
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    if sheet is not None:
        contact_sheet(pictures, [caption(s) for s in scenes], [not v["all"] for v in verdicts]).save(sheet)
    rates = {aspect: float(np.mean([v[aspect] for v in verdicts])) for aspect in (*ASPECTS, "all")}
    return {"count": options.count, "seed": options.seed, "adherence": rates["all"], "aspects": rates,
            "frechet_distance": frechet_distance(np.stack(generated), np.stack(real)),
            "seconds_per_image": seconds / options.count, "model": pipe.source,
            "device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
            "generate_options": {k: v for k, v in generate_options.items()}}


def format_report(report: dict) -> str:
    aspects = ", ".join(f"{a} {report['aspects'][a]:.0%}" for a in ASPECTS)
    return (f"{report['model']} ({report['device']}, {report['dtype']}): prompt adherence "
            f"{report['adherence']:.1%} over {report['count']} held-out captions ({aspects}); Fréchet distance "
            f"to true renders {report['frechet_distance']:.3f}; {report['seconds_per_image']:.2f} s per image")
