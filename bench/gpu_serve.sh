#!/usr/bin/env bash
# One device call: the serving load test (bench/serve_load.py) on the GPU, the server on CUDA in float16.
#
# Here, once:  bench/gpu_checks.sh --fetch-wheels    (starlette and uvicorn are not on the GPU machine)
# Device:      run(command="bash bench/gpu_serve.sh --seconds 20 --overload 2 4", carry=[".whl"])
#              (any bench/serve_load.py arguments; the JSON goes to $OUT/serve_load_gpu.json)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_serve}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source bench/gpu_wheels.sh
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
python3 bench/serve_load.py --device cuda --json "$OUT/serve_load_gpu.json" "$@" 2>&1 | tee "$OUT/serve_load.log"
