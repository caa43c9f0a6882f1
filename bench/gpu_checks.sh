#!/usr/bin/env bash
# One device call: the GPU tests, the kernel tests on CUDA, the attention benchmark, and the native kernel
# library (its GPU ctest, and time to first image with and without it); logs and JSON in $OUT.
#
# Here, once:  bench/gpu_checks.sh --fetch-wheels    (diffusers is not on the GPU machine; pure-Python wheel;
#                                                     and the native library, built into .native/)
# Device:      run(command="bash bench/gpu_checks.sh", carry=[".whl", ".native"])
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # Everything the parts import that the bare GPU machine lacks (it has torch, triton, transformers, onnx,
    # onnxruntime), at this venv's versions, every dependency named (--no-deps: nothing pulls torch). .whl is
    # cleared first: two versions of one package abort the install there.
    mkdir -p .git/info; grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    rm -rf .whl && mkdir .whl
    PYTHON="${PYTHON:-.venv/bin/python}"  # the project's venv: its versions are the ones tested here
    specs=$("$PYTHON" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' diffusers importlib_metadata zipp \
        fastapi starlette pydantic pydantic_core annotated_types annotated_doc typing_inspection typing_extensions \
        uvicorn h11 click httpx httpcore anyio sniffio certifi idna prometheus_client \
        pytest pluggy iniconfig pytest-timeout) || exit 1
    # shellcheck disable=SC2086  # one argument per package
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl $specs || exit 1
    du -sh .whl
    # The native library needs no driver to build; its files are copied (not symlinked) so they travel. cmake
    # is given the venv's python (it needs Triton), whether or not the venv is active.
    grep -qx '/.native/' .git/info/exclude || echo /.native/ >> .git/info/exclude
    cmake -S . -B build -DPython3_EXECUTABLE="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" > /dev/null && cmake --build build > /dev/null \
        && rm -rf .native && mkdir .native \
        && cp -L build/libcascade_kernels.so.1 .native/ && cp -L build/libcascade_kernels.so .native/ \
        && cp build/test_gpu_attention .native/
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
if [[ -f .native/libcascade_kernels.so ]]; then
    export CASCADE_KERNELS_LIB="$PWD/.native/libcascade_kernels.so"
    LD_LIBRARY_PATH=.native .native/test_gpu_attention 2>&1 | tee "$OUT/native_gpu.log"
    echo "native gpu_attention exit: ${PIPESTATUS[0]} (77: skipped)" | tee -a "$OUT/native_gpu.log"
    python3 -m pytest -q -p no:cacheprovider tests/test_attention_kernel.py 2>&1 | tail -n 3 | tee -a "$OUT/native_gpu.log"
    timeout --kill-after=10 300 python3 bench/first_image.py --runs 1 --json "$OUT/first_image.json" 2>&1 | tee "$OUT/first_image.log"
fi
