"""Time to first image on a GPU, with the native kernel library (ahead-of-time cubins) and without it (Triton
compiles and autotunes the attention kernel at first use). Each run is a fresh process with an empty Triton
cache, so neither gains from the other; the two modes alternate over --runs rounds.

    cmake -S . -B build && cmake --build build          # here; carry build/ to the GPU machine
    python bench/first_image.py [--model shapes] [--runs 3] [--json OUT.json]

Per run: seconds to import the engine, to load the model on CUDA with attention="triton", to the first image
and for a second one (warm), and whether the library was used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, time
start = time.perf_counter()
import engine
from cascade_kernels import attention as kernel, native
imported = time.perf_counter()
pipe = engine.load({model!r}, device="cuda", attention="triton")
loaded = time.perf_counter()
import torch
pipe.generate("a red circle on a blue background", seed=0, output_type="np"); torch.cuda.synchronize()
first = time.perf_counter()
pipe.generate("a red circle on a blue background", seed=1, output_type="np"); torch.cuda.synchronize()
second = time.perf_counter()
print(json.dumps({{"import_s": imported - start, "load_s": loaded - imported, "first_image_s": first - loaded,
                  "second_image_s": second - first, "to_first_image_s": first - start,
                  "native_used": bool(native.enabled() and kernel._native_ok), "native_error": native.load_error()}}))
"""


def run(model: str, native: bool) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"TRITON_CACHE_DIR": cache, "CASCADE_KERNELS_NATIVE": "1" if native else "0"}
        done = subprocess.run([sys.executable, "-c", CHILD.format(model=model)], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-3:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = {"native": [], "jit": []}
    for _ in range(args.runs):
        for mode in rows:
            rows[mode].append(run(args.model, native=mode == "native"))
            print(mode, json.dumps(rows[mode][-1]), flush=True)
    summary = {}
    for mode, runs in rows.items():
        ok = [r["to_first_image_s"] for r in runs if "error" not in r]
        summary[mode] = {"median_to_first_image_s": statistics.median(ok) if ok else None,
                         "min": min(ok, default=None), "max": max(ok, default=None), "runs": runs}
    print(json.dumps({m: {k: v for k, v in s.items() if k != "runs"} for m, s in summary.items()}))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "command": " ".join(["python"] + sys.argv),
                                         **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
