"""The packaged model's presets against its defaults as users call it: whole one-image `generate()` calls,
interleaved in one process (each round calls every setting once, on the next held-out caption), so the machine's
drift touches all alike. The speed a preset is certified with (cascade.json "certified": "speedup").

    python bench/preset_speed.py [--rounds 30] [--only fast turbo] [--json bench/results/preset_speed.json]
    python bench/preset_speed.py --candidates            # bench/preset_sweep.py's cached candidates too
    python bench/preset_speed.py --fast                  # every setting, the defaults too, on the fast path
    python bench/preset_speed.py --model if-cascade:random --device cuda --dtype float16 --presets-of shapes --only turbo
                                                         # the packaged model's presets on another cascade
                                                         # (bench/campaign.py: the real-size one, made in memory)

Prints, per setting, the median seconds per image (with the spread of the middle half) and its speed over the
defaults' median. --json is rewritten after every round, so a run stopped early keeps the rounds it finished.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine.bench.real_size import load_model  # noqa: E402
from engine.bench.report import save_json  # noqa: E402
from engine.demo.evaluate import held_out_scenes  # noqa: E402
from engine.demo.shapes import caption  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--only", nargs="+", default=None, help="these presets only (default: all the model's)")
    parser.add_argument("--candidates", action="store_true", help="bench/preset_sweep.py's CANDIDATES too")
    parser.add_argument("--fast", action="store_true", help="load on the fast path (compiled U-Nets; the first "
                        "call of each setting compiles its shapes, once per machine)")
    parser.add_argument("--model", default=engine.DEFAULT_MODEL,
                        help="the cascade to time (default: packaged), or if-cascade:random (real size, in memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--presets-of", default=None, metavar="MODEL",
                        help="add this model's presets to --model's (their settings, not their certificates)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    pipe = load_model(args.model, device=args.device, dtype=args.dtype, fast=args.fast)
    if args.presets_of:
        for name, preset in engine.load(args.presets_of, device="cpu").presets.items():
            pipe.add_preset(name, preset.stages)
    settings = {"default": {}, **{name: {"preset": name} for name in pipe.presets}}
    if args.candidates:
        from preset_sweep import CANDIDATES, as_options

        settings.update({name: as_options(pipe, name, setting) for name, setting in CANDIDATES.items()})
    if args.only:
        settings = {name: settings[name] for name in ["default", *args.only]}
    captions = [caption(scene) for scene in held_out_scenes(args.rounds)]
    for options in settings.values():  # first-call costs out of the timings
        pipe.generate(captions[0], seed=0, **options)
    seconds = {name: [] for name in settings}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": device, "model": str(args.model),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds, "fast": args.fast,
              "command": " ".join(sys.argv)}
    for k, prompt in enumerate(captions):
        for name, options in settings.items():
            start = time.perf_counter()
            pipe.generate(prompt, seed=k, **options)
            seconds[name].append(time.perf_counter() - start)
        save_json({**report, "rounds_done": k + 1, "complete": k + 1 == len(captions), "rows": rows(seconds)},
                  args.json)
    report = {**report, "rounds_done": len(captions), "complete": True, "rows": rows(seconds)}
    print("| setting | s per image, median (middle half) | speed vs the defaults |\n|---|---:|---:|")
    for row in report["rows"]:
        print(f"| {row['name']} | {row['median_s']:.3f} ({row['q1_s']:.3f}-{row['q3_s']:.3f}) | {row['speedup']:.2f}x |")
    return report


def rows(seconds: dict[str, list[float]]) -> list[dict]:
    """Per setting: the median seconds per image, the middle half, the speed over the defaults' median."""
    base = statistics.median(seconds["default"])
    found = []
    for name, times in seconds.items():
        q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
        found.append({"name": name, "median_s": median, "q1_s": q1, "q3_s": q3, "speedup": base / median})
    return found


if __name__ == "__main__":
    main()
