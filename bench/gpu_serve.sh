#!/usr/bin/env bash
# One device call: the serving load test (bench/serve_load.py) on the GPU, the server on CUDA in float16.
#
# Here, once:  bench/gpu_checks.sh --fetch-wheels    (starlette and uvicorn are not on the GPU machine)
# Device:      run(command="bash bench/gpu_serve.sh --seconds 15 --overload 2 --repeat 3", carry=[".whl"])
#              (any bench/serve_load.py arguments; the JSON goes to $OUT/serve_load_gpu.json). A repeat at 2x
#              takes "none" about 30 s (twice its capacity's worth of 15 s), request and step 15-20 s each, plus
#              three server starts: about 3 x 90 s in all. bench/serve_model.py --costs gpu predicts step batching's
#              p99 above request batching's for identical requests there: add --mixed-steps 4 16 for the other case.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_serve}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source bench/gpu_wheels.sh
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
python3 bench/serve_load.py --device cuda --json "$OUT/serve_load_gpu.json" "$@" 2>&1 | tee "$OUT/serve_load.log"
