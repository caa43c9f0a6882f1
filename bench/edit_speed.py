"""Edits against text-to-image on the packaged model: seconds per image, whole `generate()` calls interleaved.

    python bench/edit_speed.py [--rounds 5] [--json bench/results/edit_speed.json]

An edit runs the last int(steps x strength) steps of each stage (diffusers' get_timesteps), so at the default
strengths (0.7 stage I, 0.8 stage II; inpainting 1.0 at stage I) it runs fewer U-Net calls than text-to-image.
Each round times one call of each kind in turn, so the machine's drift touches all alike; the table gives the
median and the spread (min-max) over rounds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from PIL import Image, ImageDraw

import engine
from engine.bench.report import save_json


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    pipe = engine.default_pipeline()
    picture = pipe.generate("a large red circle on a blue background", seed=0)[0]
    mask = Image.new("L", picture.size, 0)
    ImageDraw.Draw(mask).rectangle((picture.size[0] // 2, 0, *picture.size), fill=255)
    prompt = "a large red square on a blue background"
    kinds = {
        "text-to-image": {},
        "image-to-image, default strengths (0.7, 0.8)": {"image": picture},
        "inpainting, default strengths (1.0, 0.8)": {"image": picture, "mask_image": mask},
        "image-to-image, strength 0.4": {"image": picture, "strength": 0.4},
    }
    for options in kinds.values():  # warm: first-call costs out of the timings
        pipe.generate(prompt, seed=1, **options)
    seconds = {name: [] for name in kinds}
    for _ in range(args.rounds):
        for name, options in kinds.items():
            start = time.perf_counter()
            pipe.generate(prompt, seed=1, **options)
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["text-to-image"])
    rows = [{"kind": name, "median_s": statistics.median(s), "min_s": min(s), "max_s": max(s),
             "vs_text_to_image": statistics.median(s) / base} for name, s in seconds.items()]
    print("| kind | s per image, median (min-max) | vs text-to-image |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['kind']} | {row['median_s']:.3f} ({row['min_s']:.3f}-{row['max_s']:.3f}) | "
              f"{row['vs_text_to_image']:.2f}x |")
    report = {"benchmark": "edit_speed", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
              "model": pipe.source, "rows": rows}
    save_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
