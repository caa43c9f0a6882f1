"""TensorRT on a GPU (run by bench/gpu_tensorrt.sh on the device machine): each part time-boxed and recorded,
the JSON rewritten after each, so a failure or a timeout loses only what was left.

    python bench/tensorrt_gpu.py --carried DIR --json OUT.json [--skip-real-size]

1. carried: engines built on a CPU-only machine for the default targets (sm80 sm86 sm89 sm120). What TensorRT's
   runtime says of each here (get_engine_validity, deserialisation), and what engine.load says.
2. current: the packaged model exported to ONNX (float16) here and built for "current" (this GPU). The exact
   message if TensorRT refuses; else each U-Net's output against ONNX Runtime (CPU) and torch on the same
   inputs, its latency at 2 rows (one image under guidance) against torch eager, and whole images against
   torch at the same seed.
3. real-size: the IF-I-XL U-Net (random weights, float16) exported on the GPU and built for "current": build
   time, latency at 2 rows against torch eager, output against torch (ONNX Runtime on CPU would take minutes
   per call at this size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

REPORT: dict = {}


def record(name: str, args):
    """Run part `name`, keep its result or its error, write the report."""
    def wrap(fn):
        start = time.perf_counter()
        try:
            REPORT[name] = fn()
        except Exception as exc:  # a part's failure is a finding, not the end of the run
            REPORT[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        REPORT[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, json.dumps({k: v for k, v in REPORT[name].items() if k != "traceback"})[:2000], flush=True)
        args.json.write_text(json.dumps(REPORT, indent=2) + "\n")
        return fn
    return wrap


def latency_ms(call, iters: int = 50, warmup: int = 5) -> dict:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": round(times[len(times) // 2], 3), "p10_ms": round(times[len(times) // 10], 3),
            "p90_ms": round(times[9 * len(times) // 10], 3), "iters": iters}


def unet_inputs(description: dict, rows: int, device) -> dict:
    """Random inputs for a U-Net's contract at `rows` rows (the same for every backend compared)."""
    from engine.exported.contract import resolve_dim

    g = torch.Generator().manual_seed(0)
    named = {}
    for name, spec in description["inputs"].items():
        shape = [resolve_dim(d, {"batch": rows, **description.get("sizes", {})}) for d in spec["shape"]]
        if spec["dtype"] == "int64":
            named[name] = torch.full(shape, 500 if name == "timestep" else 100, dtype=torch.int64)
        else:
            named[name] = torch.randn(shape, generator=g).to(getattr(torch, spec["dtype"]))
    return {k: v.to(device) for k, v in named.items()}


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().cpu(), b.float().cpu()
    err = (a - b).abs().max().item()
    return {"max_abs": err, "max_rel": err / max(b.abs().max().item(), 1e-12), "finite": bool(torch.isfinite(a).all())}


def carried(engines: Path) -> dict:
    import engine
    from engine.backends.tensorrt_api import require_tensorrt

    api = require_tensorrt("rtx")
    manifest = json.loads((engines / "manifest.json").read_text())
    found = {"tensorrt": api.version, "targets": manifest["tensorrt"]["targets"], "engines": {}}
    for name, component in manifest["components"].items():
        logger = api.logger()
        runtime = api.module.Runtime(logger)
        data = (engines / component["file"]).read_bytes()
        validity, diagnostics = runtime.get_engine_validity(data)
        loaded = runtime.deserialize_cuda_engine(data)
        found["engines"][name] = {"validity": str(validity), "diagnostics": int(diagnostics),
                                  "deserialized": loaded is not None, "errors": logger.errors[-5:]}
    try:
        engine.load(engines)
        found["engine_load"] = "loaded"
    except Exception as exc:
        found["engine_load"] = f"{type(exc).__name__}: {exc}"
    return found


def current(work: Path) -> dict:
    import engine
    from export.onnx import export_onnx
    from export.tensorrt import build_engines

    onnx_dir = export_onnx("shapes", out=work / "onnx16", dtype="float16", progress=False)
    start = time.perf_counter()
    engines = build_engines(onnx_dir, work / "engines", targets=("current",), progress=False)
    found = {"build_s": round(time.perf_counter() - start, 1)}
    manifest = json.loads((engines / "manifest.json").read_text())
    found["built"] = {n: c["build"] for n, c in manifest["components"].items()}
    trt_pipe = engine.load(engines)
    torch_pipe = engine.load("shapes", device="cuda", dtype="float16", attention="sdpa")
    ort_pipe = engine.load(onnx_dir, providers=["CPUExecutionProvider"])
    for i, stage in enumerate(trt_pipe.stages):
        description = manifest["components"][f"{stage.name}/unet"]
        inputs = unet_inputs(description, 2, "cuda")
        with torch.no_grad():
            out_trt = stage.unet(**inputs)
            out_torch = torch_pipe.stages[i].unet(**inputs)
            out_ort = ort_pipe.stages[i].unet(**{k: v.cpu() for k, v in inputs.items()})
        found[stage.name] = {"vs_onnxruntime": difference(out_trt, out_ort), "vs_torch": difference(out_trt, out_torch),
                             "trt": latency_ms(lambda: stage.unet(**inputs)),
                             "torch_eager": latency_ms(lambda: torch_pipe.stages[i].unet(**inputs))}
    prompt = "a red circle on a blue background"
    images = {}
    for label, pipe in (("tensorrt", trt_pipe), ("torch", torch_pipe)):
        pipe.generate(prompt, seed=0, output_type="np")  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        images[label] = pipe.generate([prompt] * 4, seed=0, output_type="np")
        torch.cuda.synchronize()
        found[f"{label}_4_images_s"] = round(time.perf_counter() - start, 3)
    import numpy as np

    a, b = (np.asarray(images[k], dtype=np.float32) for k in ("tensorrt", "torch"))
    found["images_max_abs_vs_torch"] = float(np.abs(a - b).max())
    found["images_mean_abs_vs_torch"] = float(np.abs(a - b).mean())
    return found


def real_size(work: Path) -> dict:
    from engine.bench import real_size as sizes
    from engine.backends.tensorrt_backend import TrtComponents
    from export.tensorrt import build_engines
    from tensorrt_build import real_size_unet

    onnx_dir = real_size_unet("if-i-xl:random", "float16", work / "xl-onnx", device=torch.device("cuda"))
    start = time.perf_counter()
    engines = build_engines(onnx_dir, work / "xl-engines", targets=("current",), max_images=1, progress=False)
    found = {"build_s": round(time.perf_counter() - start, 1)}
    component = TrtComponents(engines).component("stage_I/unet")
    description = json.loads((engines / "manifest.json").read_text())["components"]["stage_I/unet"]
    found["build"] = description["build"]
    inputs = unet_inputs(description, 2, "cuda")
    (part,) = [p for p in sizes.parts("if-i-xl:random") if p.kind == "unet"]
    unet = sizes.build(part, torch.device("cuda"), torch.float16)  # the same seed: the same weights

    def eager():
        return unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                    return_dict=False)[0]

    with torch.no_grad():
        found["vs_torch"] = difference(component(**inputs), eager())
        found["trt"] = latency_ms(lambda: component(**inputs), iters=20)
        found["torch_eager"] = latency_ms(eager, iters=20)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carried", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/trt-work"))
    parser.add_argument("--skip-real-size", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    REPORT["device"] = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    record("carried", args)(lambda: carried(args.carried))
    record("current", args)(lambda: current(args.work))
    if not args.skip_real_size:
        record("real_size", args)(lambda: real_size(args.work))


if __name__ == "__main__":
    main()
