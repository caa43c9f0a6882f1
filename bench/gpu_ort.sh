#!/usr/bin/env bash
# ONNX Runtime's CUDA provider on the GPU machine (which has only onnxruntime's CPU build). The onnxruntime-gpu
# wheel is 255 MB and a call carries 64 MiB, so it travels xz-compressed in pieces over back-to-back calls while
# the machine stays warm (each call stages what it carries in /tmp/ort-stage); the call that completes the set
# installs it into /tmp/ort-site, ahead of the CPU build, and runs tests/test_gpu.py's onnxruntime checks (images
# against torch, step latency). Results in $OUT. gpu_campaign.sh runs the same checks where the wheel is there.
#
# Here, once:  bash bench/gpu_ort.sh --prepare        (.ort/p0, .ort/p1, ...: one folder per call)
# Device:      run(command="bash bench/gpu_ort.sh", carry=[".ort/p0"]), then .ort/p1, ..., the last with ".whl"
set -uo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=1.31.1  # its CUDA 13 build, as the GPU machine's torch
CARRY_LIMIT=$((60 * 1024 * 1024))
if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    mkdir -p .git/info; grep -qx '/.ort/' .git/info/exclude || echo /.ort/ >> .git/info/exclude
    rm -rf .ort && mkdir -p .ort/wheel
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d .ort/wheel "onnxruntime-gpu==$ORT_VERSION"
    wheel=$(basename .ort/wheel/onnxruntime_gpu-*.whl)
    xz -9 -T0 -c ".ort/wheel/$wheel" > .ort/ort.whl.xz
    split -b "$CARRY_LIMIT" -d -a 2 .ort/ort.whl.xz .ort/ort.whl.xz.
    count=$(ls .ort/ort.whl.xz.?? | wc -l)
    for piece in .ort/ort.whl.xz.??; do
        folder=".ort/p${piece##*.}"; folder="${folder/p0/p}"; mkdir -p "$folder"; mv "$piece" "$folder/"
        echo "$wheel $count" > "$folder/set"
    done
    rm -rf .ort/wheel .ort/ort.whl.xz
    ls -d .ort/p*
    exit
fi
OUT="${OUT:-/tmp/gpu_ort}"
STAGE=/tmp/ort-stage  # outside the working copy: it survives the next call while the machine is warm
mkdir -p "$OUT" "$STAGE"
export PYTHONUNBUFFERED=1
for folder in .ort/p*; do [[ -d "$folder" ]] && cp -r "$folder"/. "$STAGE"/; done
read -r wheel count < "$STAGE/set" || { echo "nothing staged: carry .ort/p0 first"; exit 2; }
have=$(ls "$STAGE"/ort.whl.xz.?? 2>/dev/null | wc -l)
if (( have < count )); then
    echo "staged $have of $count pieces in $STAGE; carry the next .ort/pN"
    exit 0
fi
source bench/gpu_wheels.sh
if [[ ! -d /tmp/ort-site/onnxruntime ]]; then
    cat "$STAGE"/ort.whl.xz.?? | xz -dc > "$STAGE/$wheel"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ort-site "$STAGE/$wheel" || exit 2
fi
export PYTHONPATH=/tmp/ort-site:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" | tee "$OUT/providers.txt"
timeout --kill-after=10 "${ORT_GPU_S:-300}" python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py -k onnxruntime \
    2>&1 | tee "$OUT/ort_gpu.log"
