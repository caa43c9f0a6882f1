#!/usr/bin/env bash
# One device call: the GPU tests, the kernel tests on CUDA, and the attention benchmark; logs and JSON in $OUT.
#
# Here, once:  bench/gpu_checks.sh --fetch-wheels    (diffusers is not on the GPU machine; pure-Python wheel)
# Device:      run(command="bash bench/gpu_checks.sh", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .git/info; grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl "diffusers==0.42.1" importlib_metadata \
        starlette uvicorn  # the last two for bench/gpu_serve.sh
    exit
fi
OUT="${OUT:-/tmp/gpu_checks}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source bench/gpu_wheels.sh
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_attention_kernel.py 2>&1 | tee "$OUT/tests.log"
# The integration tests run the kernel on CPU tensors: the interpreter's job, also on a GPU machine.
TRITON_INTERPRET=1 python3 -m pytest -q -p no:cacheprovider tests/test_attention_integration.py 2>&1 \
    | tee -a "$OUT/tests.log"
python3 bench/attention.py --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log"
