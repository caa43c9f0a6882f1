"""A probe for the feature-caching issue (DeepCache, Ma et al. 2024): how much a shallow U-Net step saves on the
packaged model and what caching costs in adherence. It runs the torch backend's own full and shallow U-Net calls
(what `cache=` runs) under a schedule of its own (call counts within a run, --full-first), for trying schedules
the engine's `cache=` settings do not name yet.

    python bench/deepcache_probe.py [--count 64] [--intervals 1 2 3 4] [--json bench/results/deepcache_probe.json]

At a full step the U-Net runs whole and the input of its last up-block is kept; at a shallow step only the
preprocessing (time, class and text embeddings), conv_in, the first down-block, the last up-block (on the kept
input and the fresh skip connections) and the output head run. A full step every `interval` calls of a stage
(and whenever the rows change). Reported: each stage's shallow step time against its full step, at 2 and 16
rows; and the quality gate's adherence and seconds per image on `--count` held-out captions per interval.
"""

from __future__ import annotations

import argparse
import time

import torch

import engine
from engine.bench.report import save_json
from engine.demo.evaluate import EvalOptions, evaluate


class CachedUNet:
    """The torch backend's U-Net with DeepCache's shallow steps (module docstring) over its own `full` and
    `shallow` calls (what `cache=` runs), scheduled by call count instead of the engine's per-run plan;
    `depth` up-blocks (and as many down-blocks) run at a shallow step, 1 the least."""

    def __init__(self, unet, interval: int, depth: int = 1):
        self.unet, self.interval, self.depth = unet, interval, depth
        self.kept, self.calls, self.last_t = None, 0, None
        self.full_first = 0  # the first calls of a run are all full (non-uniform refresh: denser early)

    def __getattr__(self, name):  # sample_size, in_channels, ...: the wrapped U-Net's
        return getattr(self.unet, name)

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None):
        t = int(timestep.reshape(-1)[0])
        if self.last_t is None or t > self.last_t:  # a new run starts at its highest timestep
            self.calls = 0
        self.last_t = t
        full = (self.interval <= 1 or self.kept is None or self.kept.shape[0] != sample.shape[0]
                or self.calls < self.full_first or self.calls % self.interval == 0)
        self.calls += 1
        if full:
            out, self.kept = self.unet.full(sample, timestep, encoder_hidden_states, class_labels, self.depth)
            return out
        return self.unet.shallow(sample, timestep, encoder_hidden_states, class_labels, self.kept, self.depth)


def step_times(pipe, rows: int, repeats: int = 20) -> dict:
    """Median seconds of a full and a shallow step of each stage at `rows` rows."""
    out = {}
    text = pipe.text.encode(["a large red circle on a blue background"] * rows)
    for stage in pipe.stages:
        unet = stage.unet
        size = stage.size
        sample = torch.randn(rows, unet.in_channels, size, size)
        t = torch.full((rows,), 500)
        labels = torch.full((rows,), 250) if stage.noising is not None else None
        kept = unet.full(sample, t, text, labels, unet.depth)[1]
        timings = {}
        for kind, call in (("full", lambda: unet.unet(sample, t, text, labels)),
                           ("shallow", lambda: unet.shallow(sample, t, text, labels, kept, unet.depth))):
            call()
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - start)
            timings[kind] = sorted(seconds)[len(seconds) // 2]
        out[stage.name] = {**timings, "shallow_vs_full": timings["shallow"] / timings["full"]}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--full-first", type=int, nargs="+", default=[0],
                        help="runs of each: that many first calls of a stage's run always full")
    parser.add_argument("--preset", default=None, help="generate with the model's preset (e.g. fast)")
    parser.add_argument("--no-steps", action="store_true", help="skip the step timings")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    pipe = engine.load("shapes")
    for stage in pipe.stages:
        stage.unet = CachedUNet(stage.unet, 1)
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "count": args.count, "steps": {}, "gate": []}
    for depth in [] if args.no_steps else args.depths:
        for stage in pipe.stages:
            stage.unet.depth = depth
        report["steps"][depth] = {rows: step_times(pipe, rows) for rows in (2, 16)}
        for rows, stages in report["steps"][depth].items():
            print(f"depth {depth}, {rows} rows: " + ", ".join(
                f"{name} shallow {s['shallow'] * 1e3:.1f} ms / full {s['full'] * 1e3:.1f} ms = "
                f"{s['shallow_vs_full']:.0%}" for name, s in stages.items()))
    runs = [(d, i, f) for d in args.depths for i in args.intervals for f in args.full_first
            if i > 1 or (d == args.depths[0] and f == args.full_first[0])]  # no caching: one run
    options = {} if args.preset is None else {"preset": args.preset}
    for depth, interval, full_first in runs:
        for stage in pipe.stages:
            stage.unet.interval, stage.unet.depth, stage.unet.kept = interval, depth, None
            stage.unet.full_first = full_first
        result = evaluate(pipe, EvalOptions(count=args.count), **options)
        report["gate"].append({"depth": depth, "interval": interval, "full_first": full_first,
                               "preset": args.preset, "adherence": result["adherence"],
                               "seconds_per_image": result["seconds_per_image"],
                               "frechet_distance": result["frechet_distance"]})
        print(f"preset {args.preset}, depth {depth}, interval {interval}, first {full_first} full: adherence "
              f"{result['adherence']:.1%}, {result['seconds_per_image']:.3f} s per image, "
              f"distance {result['frechet_distance']:.3g}")
    save_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
