"""How the packaged shapes model's default settings were chosen: adherence and time per image over a grid.

    python bench/shapes_defaults.py [--model shapes] [--count 32] [--json bench/results/shapes_defaults.json]

Each row runs the quality gate (engine/demo/evaluate.py: the same held-out captions and seeds) at one setting of
steps, guidance and noise level, and times it; the defaults in engine/demo/train.py (SHAPES_DEFAULTS) are the
cheapest row within a point or two of the best adherence. Runs on CPU, one row after another.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


import engine
from engine.bench.report import command_line, environment, save_json
from engine.demo.evaluate import EvalOptions, evaluate

# (steps, guidance, noise level of stage II): IF's own defaults first, then cheaper and differently guided ones.
GRID = [
    (("smart27", "smart27"), (7.0, 4.0), 250),
    (("smart27", 15), (4.0, 1.0), 100),
    (("smart27", 15), (7.0, 1.0), 100),
    (("smart27", 15), (2.0, 1.0), 100),
    ((50, 15), (4.0, 1.0), 100),
    ((100, 15), (4.0, 1.0), 100),
    (("smart27", 15), (4.0, 1.0), 250),
    (("smart27", 27), (4.0, 4.0), 100),
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=engine.DEFAULT_MODEL)
    parser.add_argument("--count", type=int, default=32, help="held-out captions per row")
    parser.add_argument("--rows", type=int, nargs="*", default=None, help="only these rows of the grid")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    pipe = engine.load(args.model, device="cpu", dtype="float32")
    rows = []
    print(f"{'steps':>18} {'guidance':>10} {'noise':>5}  adherence  shape colour backgr. size  posit.  s/image")
    for k, (steps, guidance, noise_level) in enumerate(GRID):
        if args.rows is not None and k not in args.rows:
            continue
        report = evaluate(pipe, EvalOptions(count=args.count), steps=steps, guidance=guidance, noise_level=noise_level)
        a = report["aspects"]
        print(f"{steps!s:>18} {guidance!s:>10} {noise_level:>5}  {report['adherence']:>8.1%}  "
              f"{a['shape']:>5.0%} {a['colour']:>6.0%} {a['background']:>7.0%} {a['size']:>5.0%} "
              f"{a['position']:>6.0%}  {report['seconds_per_image']:.2f}", flush=True)
        rows.append({"steps": list(steps), "guidance": list(guidance), "noise_level": noise_level, **report})
    result = {"benchmark": "shapes_defaults", "model": args.model, "count": args.count, "rows": rows,
              **environment(torch.device("cpu")), "command": command_line(argv, "shapes_defaults.py"), "date": time.strftime("%Y-%m-%d")}
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
