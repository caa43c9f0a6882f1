#!/usr/bin/env bash
# The standing GPU measurement: one prepared device call, under 9 minutes on a bare H200 or H100, each part
# time-boxed (a failure or a timeout loses only that part). Logs and JSON in $OUT; commit the JSON under
# bench/results/ and the tables in bench/RESULTS.md.
#
# Here, once:  bash bench/gpu_checks.sh --fetch-wheels      (diffusers and friends into .whl/, the native
#                                                           kernel library into .native/)
# Device:      run(command="bash bench/gpu_campaign.sh", carry=[".whl", ".native"], timeout_s=570)
#
# Parts and their boxes (seconds, 590 at most, 630 with the ORT box): GPU tests (the scheduler's graph replay
# among them) 60; the fast path's GPU tests 70; native library check 20; IF-I-XL U-Net step, eager / compile / ours
# 100; IF-II-L the same 100; T5-XXL 40; the packaged cascade 40; batch jobs with and without the fast path 45; the
# server the same, at one offered load, 55 (where the carried wheels give FastAPI and uvicorn); offload memory
# against the plan 60; ONNX Runtime's CUDA provider 40 (where its wheel was carried); the quality gate in float16
# and bfloat16, 30 each. Past the call's limit (600 s) the last boxes are lost, their order is their value. TensorRT is its own pair of calls
# (bench/gpu_tensorrt.sh). Not yet here: the real-size IF-I-XL + IF-II-L cascade with T5-XXL (the benchmark
# times real-size models one component at a time).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_campaign}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source bench/gpu_wheels.sh
nvidia-smi --query-gpu=name,driver_version,compute_cap,clocks.max.sm,memory.total --format=csv | tee "$OUT/device.txt"
git log -1 --format='%H %s' 2>/dev/null | tee "$OUT/commit.txt"
part() {  # part NAME SECONDS COMMAND...: run it time-boxed, log it, say how it ended
    local name=$1 seconds=$2; shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (box ${seconds} s; 124 = timed out)" | tee -a "$OUT/parts.txt"
    tail -n 25 "$OUT/$name.log"
}
part tests 60 python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu.py tests/test_attention_kernel.py \
    -k "not fast_path"
# The fast path's capture, replay, no-allocation and no-sync tests: their own box, since they compile.
part tests_fast 70 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k fast_path
if [[ -f .native/libcascade_kernels.so ]]; then
    part native 20 env CASCADE_KERNELS_LIB="$PWD/.native/libcascade_kernels.so" LD_LIBRARY_PATH=.native \
        .native/test_gpu_attention
fi
BENCH=(python3 -m engine bench --device cuda --iters "${ITERS:-20}" --warmup "${WARMUP:-3}" --compare eager,compile,ours)
part bench_if-i-xl 100 "${BENCH[@]}" --model if-i-xl:random --json "$OUT/bench_if-i-xl.json"
part bench_if-ii-l 100 "${BENCH[@]}" --model if-ii-l:random --json "$OUT/bench_if-ii-l.json"
part bench_t5-xxl 40 python3 -m engine bench --device cuda --iters 10 --warmup 2 --model t5-xxl:random \
    --json "$OUT/bench_t5-xxl.json"
part bench_shapes 40 python3 -m engine bench --device cuda --fast --model shapes --json "$OUT/bench_shapes.json"
# The fast-path issue's serve and batch comparison: the scheduler on the executor's graphs against eager.
part batch_fast 45 python3 bench/batch_throughput.py --fast-vs-eager --device cuda --rows 32 --rounds 2 \
    --json "$OUT/batch_fast_vs_eager.json"
if python3 -c "import fastapi, uvicorn, httpx" 2>/dev/null; then
    part serve_fast 55 python3 bench/serve_load.py --fast-vs-eager --device cuda --requests 24 --overload 4 \
        --ready 30 --json "$OUT/serve_fast_vs_eager.json"
fi
# Offload: the real-size cascade (bfloat16) with offload="model", peak memory per phase against the plan.
part offload 60 python3 bench/offload_memory.py --json "$OUT/offload_memory.json"
# ONNX Runtime's CUDA provider, where the onnxruntime-gpu wheel was carried (bench/gpu_wheels.sh stages it).
if python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
        2>/dev/null; then
    part ort_cuda 40 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k onnxruntime
fi
# The quality gate in half precision on the packaged model (the target: within 2 points of float32's).
for dtype in float16 bfloat16; do
    part "gate_$dtype" 30 python3 -m engine eval --device cuda --dtype "$dtype" --count 64 --quiet \
        --json "$OUT/eval_shapes_$dtype.json"
done
cat "$OUT/parts.txt"
