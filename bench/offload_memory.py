"""Offload on a GPU: the real-size cascade (T5-XXL, IF-I-XL, IF-II-L; bfloat16) with offload="model", each
phase's peak device memory (torch.cuda.max_memory_allocated) against the memory plan's (engine/plan.py), and
the seconds each part takes to go on.

    python bench/offload_memory.py --json OUT.json [--dtype bfloat16] [--images 1]

The models are the published architectures (engine/configs/real_size.json) with uninitialised weights: memory
and copy times do not depend on the values. Each phase runs its part's forward once at the plan's shapes. The
GPU issue's targets: a peak of at most 12 GB, and the plan within 10% of every phase.

What is resident, per phase: the running part, and beside it the next part where the offloader copied it ahead
(engine/offload.py: only where free memory is PREFETCH_MARGIN times its size, so always on a large card and
never on the 16 GB card the targets are for). The peak is measured from the moment the running part is on
(the part before it already off), and the verdicts are judged on the phase's own peak: the measured peak less
the bytes of the part copied ahead, which the plan does not count (a card that cannot hold both copies none
ahead). Both figures are reported.
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
    by_name = {p.name: p for p in offloader.parts}
    with torch.inference_mode():
        for part, planned in zip(parts, plan.phases):
            came_ahead = part.name in offloader.ahead
            torch.cuda.synchronize()
            start = time.perf_counter()
            offloader.activate(by_name[part.name])
            # until the part is usable on the compute stream (a device-wide sync would also wait for the next
            # part's copy ahead, which overlaps this phase)
            torch.cuda.current_stream(device).synchronize()
            on_seconds = time.perf_counter() - start
            ahead = offloader.ahead  # copied ahead by this activation, beside the running part
            ahead_bytes = sum(by_name[name].bytes for name in ahead)
            # The part before, if it came ahead, is freed only once the allocator sees its last use done
            # (record_stream): empty_cache settles that, so the peak from here holds the running part, what is
            # copied ahead, and the call's own memory
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            inputs, options = phase_inputs(part, args.images, device)
            modules[part.name](*inputs, **options)
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated(device)
            own = measured - ahead_bytes  # the phase's own peak: what the plan models and the targets judge
            report["phases"].append({
                "part": part.name, "resident": list(offloader.resident), "running_bytes": by_name[part.name].bytes,
                "ahead": ahead, "ahead_bytes": ahead_bytes, "measured_bytes": measured, "phase_bytes": own,
                "planned_bytes": planned.total, "plan_error": planned.total / own - 1,
                "within_10_percent": abs(planned.total / own - 1) <= 0.10, "came_ahead": came_ahead,
                "on_seconds": on_seconds,
                # a copy made ahead overlapped the phase before: its on_seconds is a wait, not a transfer
                "weights_gb_per_s": None if came_ahead else planned.weights / on_seconds / 1e9})
            beside = f" + {', '.join(ahead)} ahead {ahead_bytes / 1e9:.2f} GB" if ahead else ""
            print(f"{part.name:16} phase {own / 1e9:6.2f} GB{beside}, planned {planned.total / 1e9:6.2f} GB "
                  f"({planned.total / own - 1:+.1%}); on in {on_seconds:.2f} s{' (came ahead)' if came_ahead else ''}")
    report["peak_bytes"] = max(p["phase_bytes"] for p in report["phases"])
    report["peak_with_ahead_bytes"] = max(p["measured_bytes"] for p in report["phases"])
    report["planned_peak_bytes"] = plan.peak
    report["peak_within_12_gb"] = report["peak_bytes"] <= 12e9
    report["plan_within_10_percent"] = all(p["within_10_percent"] for p in report["phases"])
    print(f"peak {report['peak_bytes'] / 1e9:.2f} GB without the part copied ahead (target <= 12 GB: "
          f"{'met' if report['peak_within_12_gb'] else 'MISSED'}), {report['peak_with_ahead_bytes'] / 1e9:.2f} GB "
          f"with it; planned {plan.peak / 1e9:.2f} GB (within 10% of every phase: "
          f"{'yes' if report['plan_within_10_percent'] else 'NO'})")
    save_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
