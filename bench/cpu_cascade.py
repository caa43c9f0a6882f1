"""CPU benchmark: our cascade vs diffusers' IF pipelines on the same model, same steps, in one run.

    python bench/cpu_cascade.py [--model shapes] [--runs 5] [--steps N|NAME] [--fast] [--json bench/results/cpu_cascade.json]

Both run the whole request (prompt encoding, stage I, stage II) with the same seed, and the model's default
steps, guidance and noise level (or --steps for both stages) resolved by our Pipeline; the
outputs are compared too, so the two timings are of the same work. Runs alternate ours/theirs so that
machine noise hits both alike; medians and their ratio are reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import engine
from engine.bench.report import command_line, save_json
from engine.bench.timing import interleaved
from engine.model_dir import PACKAGED_ROOT
from engine.testing.reference import reference_cascade, run_reference

PROMPT = "a red circle on a blue background"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=engine.DEFAULT_MODEL, help="packaged name or cascade directory")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", default=None, help="a step count or named schedule for both stages "
                                                      "(default: the model's defaults)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                        help="ours on the fast path (default: the device's, off on CPU); compiling is done before "
                             "the timed runs")
    args = parser.parse_args(argv)

    model_dir = Path(args.model) if Path(args.model).is_dir() else PACKAGED_ROOT / args.model
    steps = None if args.steps is None else int(args.steps) if args.steps.isdigit() else args.steps
    ours = engine.load(model_dir, device="cpu", fast=args.fast)
    theirs = reference_cascade(model_dir)
    request = engine.GenerateRequest(PROMPT, seed=0, steps=steps, output_type="np")
    settings = ours.settings(request)  # the same resolved steps, guidance and noise level for diffusers
    timesteps = tuple(s.timesteps for s in settings)
    guidance = tuple(s.guidance for s in settings)

    def run_ours():
        return ours.run(request).images

    def run_theirs():
        return run_reference(theirs, PROMPT, 0, timesteps, guidance, noise_level=settings[1].noise_level)

    difference = float(np.abs(run_ours() - run_theirs()).max())  # also the warm-up
    times = interleaved({"ours": run_ours, "diffusers": run_theirs}, args.runs)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "cpu_cascade", "model": args.model, "prompt": PROMPT,
        "settings": [{"steps": s.timesteps if isinstance(s.timesteps, int) else len(s.timesteps),
                      "guidance": s.guidance, "noise_level": s.noise_level} for s in settings],
        "runs": args.runs, "median_s": medians, "all_s": times,
        "speedup_vs_diffusers": medians["diffusers"] / medians["ours"],
        "max_abs_difference": difference,
        "image_size": ours.image_size,
        "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": __import__("diffusers").__version__, "engine": engine.__version__},
        "command": command_line(argv, "cpu_cascade.py"),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{'':12}{'median s':>10}  runs")
    for name in times:
        print(f"{name:12}{medians[name]:>10.3f}  {', '.join(f'{t:.3f}' for t in times[name])}")
    print(f"speed-up vs diffusers: {result['speedup_vs_diffusers']:.2f}x; "
          f"max abs difference of the images: {difference:.2e}")
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
