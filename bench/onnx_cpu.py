"""CPU benchmark: ONNX Runtime vs torch eager on the same cascade, per U-Net step and for the whole cascade.

    python bench/onnx_cpu.py [--model shapes] [--runs 5] [--steps-iters 20] [--json bench/results/onnx_cpu.json]

The model is exported once (into a temporary directory) and checked against torch before anything is timed.
Per-step: one U-Net call of each stage at CFG batch 2, torch eager vs ONNX Runtime as `engine.load` sets it up
(spin-waiting threads), in turns of PER_TURN back-to-back calls as the denoising loop makes them, the turns
interleaved so machine noise hits both alike, with PAUSE_S idle before each turn: ORT's threads spin for about
40 ms after a call and would otherwise slow the torch call timed next. Whole cascade: the default request end
to end (prompt, stage I, stage II), interleaved the same way, one run per turn.
Medians and ratios (torch time / ORT time) are reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import engine
from engine.bench.report import command_line, save_json
from engine.bench.timing import interleaved
from export.onnx import export_onnx, versions

PROMPT = "a red circle on a blue background"
PAUSE_S = 0.1  # idle before each turn: ORT's spinning threads (about 40 ms after a call) have parked
PER_TURN = 5  # back-to-back U-Net calls per turn


def unet_inputs(stage, text_dim: int, batch: int = 2):
    size = stage.size
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, stage.unet.in_channels, size, size, generator=gen)
    labels = torch.full((batch,), 250) if stage.kind == "super_resolution" else None
    return sample, torch.tensor(500), torch.randn(batch, 77, text_dim, generator=gen), labels


def medians(calls: dict, iters: int, warmup: int, per_turn: int = 1) -> dict:
    samples = interleaved(calls, iters, warmup, pause_s=PAUSE_S, per_turn=per_turn)
    return {name: statistics.median(t) for name, t in samples.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=engine.DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=5, help="whole-cascade runs per backend")
    parser.add_argument("--steps-iters", type=int, default=20, help="U-Net calls per backend and stage")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    torch_pipe = engine.load(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(args.model, out=Path(tmp) / "onnx", progress=False)
        ort_pipe = engine.load(exported)

        steps = {}
        per_turn = min(PER_TURN, args.steps_iters)
        turns = -(-args.steps_iters // per_turn)  # at least --steps-iters calls per backend and stage
        for torch_stage, ort_stage in zip(torch_pipe.stages, ort_pipe.stages, strict=True):
            inputs = unet_inputs(torch_stage, torch_pipe.text.dim)
            with torch.inference_mode():
                times = medians({"torch": lambda s=torch_stage, x=inputs: s.unet(*x),
                                 "onnxruntime": lambda s=ort_stage, x=inputs: s.unet(*x)},
                                turns, 3, per_turn=per_turn)
            steps[torch_stage.name] = {k: v * 1e3 for k, v in times.items()}  # ms

        request = engine.GenerateRequest(PROMPT, seed=0)
        outputs = {name: pipe.generate(PROMPT, seed=0, output_type="np")
                   for name, pipe in (("torch", torch_pipe), ("onnxruntime", ort_pipe))}
        difference = float(np.abs(outputs["torch"] - outputs["onnxruntime"]).max())
        cascade = medians({"torch": lambda: torch_pipe.run(request), "onnxruntime": lambda: ort_pipe.run(request)},
                              args.runs, warmup=1)

    report = {"benchmark": "onnx_cpu", "model": args.model, "date": time.strftime("%Y-%m-%d"),
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "pause_s": PAUSE_S, "per_turn": PER_TURN,
              "versions": versions(), "command": command_line(argv, "onnx_cpu.py"),
              "unet_step_ms": steps, "cascade_s": cascade, "max_abs_difference": difference}
    print(f"{args.model}: U-Net step at CFG batch 2 (median ms) and whole default cascade (median s), CPU")
    for name, t in steps.items():
        print(f"  {name}: torch {t['torch']:.1f}, onnxruntime {t['onnxruntime']:.1f} "
              f"({t['torch'] / t['onnxruntime']:.2f}x)")
    print(f"  cascade: torch {cascade['torch']:.2f}, onnxruntime {cascade['onnxruntime']:.2f} "
          f"({cascade['torch'] / cascade['onnxruntime']:.2f}x); outputs differ by {difference:.1e}")
    save_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
