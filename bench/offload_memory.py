"""Offload on a GPU: the real-size cascade (T5-XXL, IF-I-XL, IF-II-L; bfloat16) with offload="model", each
phase's peak device memory (torch.cuda.max_memory_allocated) against the memory plan's (engine/plan.py), and
the seconds each part takes to go on.

    python bench/offload_memory.py --json OUT.json [--dtype bfloat16] [--images 1]

The models are the published architectures (engine/configs/real_size.json) with uninitialised weights: memory
and copy times do not depend on the values. Each phase runs its part's forward once at the plan's shapes. The
GPU issue's targets: a peak of at most 12 GB, and the plan within 10% of every phase.
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.bench.real_size import real_size_parts
from engine.bench.report import save_json
from engine.loading import DTYPES
from engine.offload import Offloader, Part
from engine.plan import TOKENS, build, memory_plan


def phase_inputs(part, images: int, device: torch.device):
    """The arguments of one call of `part` at the plan's shapes (plan.activation_peak's), on `device`."""
    rows = 2 * images
    if part.kind == "t5":
        return (torch.zeros(images, TOKENS, dtype=torch.long, device=device),), {}
    config = part.config
    width = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    labels = torch.zeros(rows, dtype=torch.long, device=device) if config["in_channels"] != 3 else None
    sample = torch.zeros(rows, config["in_channels"], part.side, part.side, dtype=part.dtype, device=device)
    return ((sample, torch.zeros(rows, dtype=torch.long, device=device)),
            {"encoder_hidden_states": torch.zeros(rows, TOKENS, width, dtype=part.dtype, device=device),
             "class_labels": labels})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16"))
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    parts = real_size_parts(dtype)
    plan = memory_plan(parts, "model", args.images)
    modules = {}
    for part in parts:  # uninitialised weights in host memory (to_empty: one allocation, no init)
        modules[part.name] = build(part).to_empty(device="cpu")
    offloader = Offloader([Part(p.name, modules[p.name], [modules[p.name]], pin=True) for p in parts], device, "model")
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "dtype": args.dtype,
              "images": args.images, "phases": []}
    with torch.inference_mode():
        for part, planned in zip(parts, plan.phases):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            offloader.activate(next(p for p in offloader.parts if p.name == part.name))
            torch.cuda.synchronize()
            on_seconds = time.perf_counter() - start
            inputs, options = phase_inputs(part, args.images, device)
            modules[part.name](*inputs, **options)
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated(device)
            report["phases"].append({"part": part.name, "measured_bytes": measured, "planned_bytes": planned.total,
                                     "plan_error": planned.total / measured - 1, "on_seconds": on_seconds,
                                     "weights_gb_per_s": planned.weights / on_seconds / 1e9})
            print(f"{part.name:16} measured {measured / 1e9:6.2f} GB, planned {planned.total / 1e9:6.2f} GB "
                  f"({planned.total / measured - 1:+.1%}); on in {on_seconds:.2f} s")
    report["peak_bytes"] = max(p["measured_bytes"] for p in report["phases"])
    report["planned_peak_bytes"] = plan.peak
    print(f"peak {report['peak_bytes'] / 1e9:.2f} GB (target <= 12 GB); planned {plan.peak / 1e9:.2f} GB")
    save_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
