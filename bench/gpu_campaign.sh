#!/usr/bin/env bash
# The standing GPU measurement: prepared device calls on a bare H200 or H100, each part time-boxed (a failure
# or a timeout loses only that part), ordered by value. Logs and JSON in $OUT; commit the JSON under
# bench/results/ and the tables in bench/RESULTS.md.
#
# Here, once:  bash bench/gpu_checks.sh --fetch-wheels      (diffusers and friends into .whl/, the native
#                                                           kernel library into .native/)
#              bash bench/gpu_ort.sh --prepare              (optional: ONNX Runtime's CUDA build, staged by
#                                                           bench/gpu_ort.sh's own calls first)
# Device:      run(command="bash bench/gpu_campaign.sh", carry=[".whl", ".native"], timeout_s=590)
#              and, if that call ran out of time, again from the first part it did not finish:
#              run(command="bash bench/gpu_campaign.sh NAME", ...) (parts.txt says which)
#
# Parts and their boxes, seconds (1200 at most: two calls, a third from the part it stopped at): GPU tests (the scheduler's graph replay among them)
# 60; the fast path's GPU tests 70; native library check 20; IF-I-XL U-Net step, eager / compile / ours 100;
# IF-II-L the same 100; the whole real-size cascade with T5-XXL, writing its random weights 90 and timing it 150;
# the packaged model's presets (turbo: feature caching) against the defaults on that cascade 60; T5-XXL 40; the packaged cascade 40; batch jobs with and without the fast path 45; the server the same, at one
# offered load, 55 (where the carried wheels give FastAPI and uvicorn); offload memory against the plan 60; ONNX
# Runtime's CUDA provider 40 (where its wheel is installed); the quality gate in float16 and bfloat16, 30 each;
# the attention kernel against SDPA 40, and attention="auto"'s choice on the real-size U-Nets 90.
# TensorRT is its own pair of calls (bench/gpu_tensorrt.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_campaign}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source bench/gpu_wheels.sh
nvidia-smi --query-gpu=name,driver_version,compute_cap,clocks.max.sm,memory.total --format=csv | tee "$OUT/device.txt"
git log -1 --format='%H %s' 2>/dev/null | tee "$OUT/commit.txt"
FROM="${1:-}"  # bash bench/gpu_campaign.sh NAME: start at part NAME (a second call goes on where one stopped)
part() {  # part NAME SECONDS COMMAND...: run it time-boxed, log it, say how it ended
    local name=$1 seconds=$2; shift 2
    if [[ -n "$FROM" && "$name" != "$FROM" ]]; then echo "$name: skipped (starting at $FROM)"; return; fi
    FROM=""
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
# The whole published cascade at real size (T5-XXL, IF-I-XL, IF-II-L; random weights written once, 21 GB in
# float16), ours against diffusers eager, smart27 + smart27: the 0.85 s per image target.
part write_real_cascade 90 python3 -c "import torch; from engine.bench.real_size import write_cascade; \
write_cascade('/tmp/if-real', 'cuda', torch.float16)"
part bench_real_cascade 150 python3 -m engine bench --model /tmp/if-real --device cuda --compare eager,ours \
    --iters 3 --warmup 1 --json "$OUT/bench_real_cascade.json"
# Feature caching's turbo (and the other presets' settings) against the defaults, whole generate() calls
# interleaved on the real-size cascade, eager U-Nets (the fast path would compile each step kind first).
part turbo_real 60 python3 bench/preset_speed.py --model /tmp/if-real --device cuda --dtype float16 \
    --presets-of shapes --rounds 4 --json "$OUT/presets_real_cascade.json"
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
# ONNX Runtime's CUDA provider, where bench/gpu_ort.sh installed its CUDA build.
[[ -d /tmp/ort-site/onnxruntime ]] && export PYTHONPATH=/tmp/ort-site:${PYTHONPATH:-}
if python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
        2>/dev/null; then
    part ort_cuda 40 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k onnxruntime
fi
# The quality gate in half precision on the packaged model (the target: within 2 points of float32's).
for dtype in float16 bfloat16; do
    part "gate_$dtype" 30 python3 -m engine eval --device cuda --dtype "$dtype" --count 64 --quiet \
        --json "$OUT/eval_shapes_$dtype.json"
done
# The attention kernel against SDPA per shape, and attention="auto"'s choice per real-size U-Net (timed at load).
part attention 40 python3 bench/attention.py --json "$OUT/attention.json"
part attention_auto 90 python3 -c "import logging, engine; logging.basicConfig(level=logging.INFO); \
engine.load('/tmp/if-real', device='cuda', attention='auto')"
cat "$OUT/parts.txt"
