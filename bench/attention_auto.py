"""attention="auto" on a cascade's U-Nets: which attention each one keeps when it loads, and the times that
chose it (each U-Net is timed with SDPA and our Triton kernel as it will run; engine/backends/attention.py).

    python bench/attention_auto.py --model if-cascade:random --device cuda [--no-fast] --json OUT.json

On the fast path (the default on CUDA) each choice is compiled and replayed from a CUDA graph to be timed: two
compiles per U-Net at load, minutes at real size; --no-fast times the eager runtime's form (channels_last, CUDA
events) in seconds. The model is any --model the engine loads, or a real-size cascade made in memory (if-cascade:random). Where
"auto" cannot time (a CPU: the kernel runs only in Triton's interpreter there) the load resolves it to SDPA
without timing, and the report says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.bench.real_size import load_model  # noqa: E402
from engine.bench.report import command_line, environment, save_json  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="if-cascade:random")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                        help="time the choices as the fast path runs them (default: the device's default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    pipe = load_model(args.model, device=args.device, dtype=args.dtype, fast=args.fast, attention="auto")
    stages = []
    for stage in pipe.stages:
        seconds = getattr(stage.unet, "attention_seconds", None)  # None: not timed (resolved without timing)
        stages.append({"stage": stage.name, "attention": stage.unet.attention,
                       "seconds": seconds, "timed": seconds is not None})
        timing = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in (seconds or {}).items()) or "not timed"
        print(f"{stage.name}: attention={stage.unet.attention} ({timing})")
    report = {"benchmark": "attention_auto", "command": command_line(argv, "attention_auto.py"),
              "date": time.strftime("%Y-%m-%d"), **environment(pipe.device), "model": args.model, "fast": args.fast,
              "load_seconds": time.perf_counter() - start, "stages": stages}
    save_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
