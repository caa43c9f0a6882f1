#!/usr/bin/env bash
# TensorRT on the GPU machine: does TensorRT for RTX run there (Hopper is not among its targets), at what step
# latency, and how far from ONNX Runtime and torch. Two device calls, because the wheels are 95 MB and one call
# carries 64 MiB: the first stages half of them on the machine (kept while it stays warm), the second the rest,
# then runs bench/tensorrt_gpu.py. Results (JSON, log) in $OUT.
#
# Here, once:  bash bench/gpu_checks.sh --fetch-wheels     (diffusers, for the torch backend there)
#              bash bench/gpu_tensorrt.sh --prepare        (.trt/a and .trt/b: the wheels, xz-compressed and
#                                                           split, and the packaged model's engines built here)
# Device:      run(command="bash bench/gpu_tensorrt.sh", carry=[".trt/a"])            # stages part a
#              run(command="bash bench/gpu_tensorrt.sh", carry=[".trt/b", ".whl"])    # stages b, then runs
set -uo pipefail
cd "$(dirname "$0")/.."
TRT_VERSION=1.7.1.116
CARRY_LIMIT=$((60 * 1024 * 1024))  # per carried folder, under the 64 MiB a call carries (with .whl)
if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    mkdir -p .git/info; grep -qx '/.trt/' .git/info/exclude || echo /.trt/ >> .git/info/exclude
    rm -rf .trt && mkdir -p .trt/wheels .trt/a .trt/b
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d .trt/wheels "tensorrt-rtx-cu13-libs==$TRT_VERSION" "tensorrt-rtx-cu13-bindings==$TRT_VERSION"
    xz -9e -T0 -c .trt/wheels/tensorrt_rtx_cu13_libs-*.whl > .trt/libs.whl.xz
    split -n 2 -d .trt/libs.whl.xz .trt/libs.whl.xz.
    mv .trt/libs.whl.xz.00 .trt/a/ && mv .trt/libs.whl.xz.01 .trt/b/
    basename .trt/wheels/tensorrt_rtx_cu13_libs-*.whl > .trt/b/libs.name
    cp .trt/wheels/tensorrt_rtx_cu13_bindings-*.whl .trt/b/
    # The packaged model's float16 engines for the default targets (no GPU needed to build them)
    .venv/bin/python -m engine export shapes --format tensorrt --dtype float16 --out .trt/engines --quiet
    tar -C .trt -cJf .trt/a/engines.tar.xz engines
    rm -rf .trt/wheels .trt/libs.whl.xz .trt/engines
    for part in .trt/a .trt/b; do
        size=$(du -sb "$part" | cut -f1)
        echo "$part: $((size / 1024 / 1024)) MiB"
        (( size < CARRY_LIMIT )) || { echo "$part is over $((CARRY_LIMIT / 1024 / 1024)) MiB: it cannot be carried"; exit 1; }
    done
    exit
fi
OUT="${OUT:-/tmp/gpu_tensorrt}"
STAGE=/tmp/trt-stage  # outside the working copy: it survives the next call while the machine is warm
mkdir -p "$OUT" "$STAGE"
export PYTHONUNBUFFERED=1
for part in .trt/a .trt/b; do [[ -d "$part" ]] && cp -r "$part"/. "$STAGE"/; done
missing=()
for piece in libs.whl.xz.00 libs.whl.xz.01 libs.name engines.tar.xz; do [[ -e "$STAGE/$piece" ]] || missing+=("$piece"); done
compgen -G "$STAGE/tensorrt_rtx_cu13_bindings-*.whl" > /dev/null || missing+=(bindings wheel)
if (( ${#missing[@]} )); then
    echo "staged in $STAGE; still to carry: ${missing[*]} (the other of .trt/a, .trt/b)"
    exit 0
fi
source bench/gpu_wheels.sh
if [[ ! -d /tmp/trt-site/tensorrt_rtx_bindings ]]; then
    cat "$STAGE"/libs.whl.xz.0? | xz -dc > "$STAGE/$(cat "$STAGE/libs.name")"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/trt-site "$STAGE"/*.whl || exit 2
    tar -C "$STAGE" -xJf "$STAGE/engines.tar.xz"
fi
export PYTHONPATH=/tmp/trt-site:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv | tee "$OUT/device.txt"
timeout --kill-after=10 "${TRT_GPU_S:-540}" python3 bench/tensorrt_gpu.py --carried "$STAGE/engines" --json "$OUT/tensorrt_gpu.json" \
    2>&1 | tee "$OUT/tensorrt_gpu.log"
