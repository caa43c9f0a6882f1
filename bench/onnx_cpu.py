"""CPU benchmark: ONNX Runtime vs torch eager on the same cascade, per U-Net step and for the whole cascade.

    python bench/onnx_cpu.py [--model tiny-random] [--runs 5] [--steps-iters 20] [--json bench/results/onnx_cpu.json]

The model is exported once (into a temporary directory) and checked against torch before anything is timed.
Per-step: one U-Net call of each stage at CFG batch 2, torch eager vs ONNX Runtime with the engine's session
options, interleaved so machine noise hits both alike; then, on its own (its spinning threads would slow the
torch calls next to it), ONNX Runtime with thread spin-waiting on, ORT's default. Whole cascade: the default
request end to end (prompt, stage I, stage II), interleaved.
Medians and ratios (torch time / ORT time) are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command_line, interleaved, save_json  # noqa: E402

import engine  # noqa: E402
from engine.backends.onnxruntime_backend import OrtComponent, OrtUNet, session_options  # noqa: E402
from export.onnx import export_onnx, versions  # noqa: E402

PROMPT = "a red circle on a blue background"


def unet_inputs(stage, text_dim: int, batch: int = 2):
    size = stage.size
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, stage.unet.in_channels, size, size, generator=gen)
    labels = torch.full((batch,), 250) if stage.kind == "super_resolution" else None
    return sample, torch.tensor(500), torch.randn(batch, 77, text_dim, generator=gen), labels


def medians(calls: dict, iters: int, warmup: int) -> dict:
    return {name: statistics.median(t) for name, t in interleaved(calls, iters, warmup).items()}


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
        manifest = json.loads((exported / "manifest.json").read_text())

        steps = {}
        for torch_stage, ort_stage in zip(torch_pipe.stages, ort_pipe.stages):
            inputs = unet_inputs(torch_stage, torch_pipe.text.dim)
            description = manifest["components"][f"{ort_stage.name}/unet"]
            spinning = OrtUNet(OrtComponent(exported / description["file"], description, ["CPUExecutionProvider"],
                                            session_options(spinning=True), torch.device("cpu")),
                               json.loads((exported / ort_stage.name / "unet" / "config.json").read_text()),
                               torch.float32)
            with torch.inference_mode():
                times = medians({"torch": lambda s=torch_stage: s.unet(*inputs),
                                     "onnxruntime": lambda s=ort_stage: s.unet(*inputs)}, args.steps_iters, 3)
                # Apart: a spinning session's threads keep spinning after its call and slow whatever runs next.
                times["onnxruntime_spinning"] = medians({"spin": lambda u=spinning: u(*inputs)},
                                                        args.steps_iters, 3)["spin"]
                del spinning
            steps[torch_stage.name] = {k: v * 1e3 for k, v in times.items()}  # ms

        request = engine.GenerateRequest(PROMPT, seed=0)
        outputs = {name: pipe.generate(PROMPT, seed=0, output_type="np")
                   for name, pipe in (("torch", torch_pipe), ("onnxruntime", ort_pipe))}
        difference = float(np.abs(outputs["torch"] - outputs["onnxruntime"]).max())
        cascade = medians({"torch": lambda: torch_pipe.run(request), "onnxruntime": lambda: ort_pipe.run(request)},
                              args.runs, warmup=1)

    report = {"benchmark": "onnx_cpu", "model": args.model, "date": time.strftime("%Y-%m-%d"),
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "versions": versions(), "command": command_line("onnx_cpu.py", argv),
              "unet_step_ms": steps, "cascade_s": cascade, "max_abs_difference": difference}
    print(f"{args.model}: U-Net step at CFG batch 2 (median ms) and whole default cascade (median s), CPU")
    for name, t in steps.items():
        print(f"  {name}: torch {t['torch']:.1f}, onnxruntime {t['onnxruntime']:.1f} "
              f"({t['torch'] / t['onnxruntime']:.2f}x), onnxruntime with spinning {t['onnxruntime_spinning']:.1f} "
              f"({t['torch'] / t['onnxruntime_spinning']:.2f}x)")
    print(f"  cascade: torch {cascade['torch']:.2f}, onnxruntime {cascade['onnxruntime']:.2f} "
          f"({cascade['torch'] / cascade['onnxruntime']:.2f}x); outputs differ by {difference:.1e}")
    save_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
