"""TensorRT engine builds on this machine (no GPU needed): seconds, engine size and peak memory per component.

    python bench/tensorrt_build.py [--models shapes three-stage if-ii-l if-i-xl] [--dtypes float32 float16]
                                   [--targets sm80 sm86 sm89 sm120] [--json bench/results/tensorrt_build.json]

shapes is the packaged model, three-stage the tests' tiny IF + x4 cascade; both go through the ONNX export
and `export.tensorrt.build_engines`, as `python -m engine export --format tensorrt` does. if-ii-l and if-i-xl
are the real-size U-Nets with random weights (engine/bench/real_size.py), exported to ONNX alone (float16
only) and built the same way: a benchmark of the build, not of pictures. Each model builds in its own
process, so its peak memory (ru_maxrss: the export and the build together) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("shapes", "three-stage", "if-ii-l", "if-i-xl")
REAL_SIZE = {"if-ii-l": "if-ii-l:random", "if-i-xl": "if-i-xl:random"}


def onnx_export(model: str, dtype: str, work: Path) -> Path:
    """An ONNX export directory of `model` (the real-size ones: one U-Net graph and a minimal manifest)."""
    from export.onnx import export_onnx

    if model == "shapes":
        return export_onnx("shapes", out=work / "onnx", dtype=dtype, progress=False)
    if model == "three-stage":
        from engine.testing.random_models import write_three_stage_cascade

        return export_onnx(write_three_stage_cascade(work / "model"), out=work / "onnx", dtype=dtype, progress=False)
    return real_size_unet(REAL_SIZE[model], dtype, work / "onnx")


def real_size_unet(name: str, dtype: str, out: Path, device=None) -> Path:
    """The real-size U-Net `name` (random weights) as a one-graph ONNX export at `out`, traced on `device`."""
    import torch

    from engine.bench import real_size
    from engine.exported import manifest as manifest_io
    from engine.backends.torch_backend import TorchUNet
    from export.onnx import _export_graph, unet_graphs, versions

    (part,) = [p for p in real_size.parts(name) if p.kind == "unet"]
    device = device or torch.device("cpu")
    unet = real_size.build(part, device, getattr(torch, dtype))
    (contract, module), *_ = unet_graphs("stage_I", TorchUNet(unet, device=device), dtype)  # the full call's graph
    out.mkdir(parents=True)
    _export_graph(module, contract, out, device)
    del unet, module
    manifest_io.write(out, {"precision": dtype, "source": {"model": name, "sha256": "0" * 64}, "notice": None,
                            "versions": versions(), "components": {contract.name: {**contract.describe(), "check": None}},
                            "stages": [], "presets": {}})
    return out


def one(model: str, dtype: str, targets: list[str]) -> dict:
    """Export and build one model in this process; its figures."""
    from export.tensorrt import build_engines

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        onnx_dir = onnx_export(model, dtype, Path(tmp))
        exported = time.perf_counter() - start
        out = build_engines(onnx_dir, Path(tmp) / "engines", targets=tuple(targets), progress=False)
        manifest = json.loads((out / "manifest.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"model": model, "dtype": dtype, "targets": manifest["tensorrt"]["targets"],
            "tensorrt": f"{manifest['tensorrt']['flavour']} {manifest['tensorrt']['version']}",
            "onnx_export_s": round(exported, 1), "peak_rss_gib": round(peak, 2),
            "components": {name: {k: c["build"][k] for k in ("seconds", "bytes", "layers", "fused_attention")}
                           for name, c in manifest["components"].items()}}


def cpu_name() -> str:
    match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").exists() else None
    return match.group(1) if match else platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["shapes", "three-stage"])
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "float16"), default=["float32", "float16"])
    parser.add_argument("--targets", nargs="+", default=["sm80", "sm86", "sm89", "sm120"])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model and dtype")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.targets)))
        return
    rows = []
    for model in args.models:
        for dtype in args.dtypes:
            if model in REAL_SIZE and dtype != "float16":
                continue  # real size: float16 only (what a GPU runs; float32 IF-I-XL is 17 GB of weights)
            command = [sys.executable, __file__, "--one", model, dtype, "--targets", *args.targets]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                    {"model": model, "dtype": dtype, "error": done.stderr.strip().splitlines()[-1:]}
            except subprocess.TimeoutExpired:
                row = {"model": model, "dtype": dtype, "error": f"over {args.timeout:.0f}s"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        import torch

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
