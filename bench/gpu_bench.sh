#!/usr/bin/env bash
# One device call: `python -m engine bench` side by side (diffusers eager, diffusers + torch.compile in mode
# $COMPILE_MODE, default "default"; ours) on every real-size random model, then the packaged cascade; JSON,
# tables and logs in $OUT. The standing measurement is bench/gpu_campaign.sh; this is the free-form one.
#
# Here, once:  bash bench/gpu_checks.sh --fetch-wheels          (diffusers is not on the GPU machine)
# Device:      run(command="bash bench/gpu_bench.sh", carry=[".whl"])
#              run(command="bash bench/gpu_bench.sh if-i-xl:random", carry=[".whl"])      # some models only
#              run(command="COMPARE=eager,ours bash bench/gpu_bench.sh", carry=[".whl"])  # no compile: quick
#
# COMPILE_MODE=max-autotune compiles each model for minutes (first_call_ms in the JSON), so with a 10-minute
# limit per device call, give one model per call then; each model runs in its own process (a failure or a timeout loses only
# that model) and PER_MODEL_S (default 540 s) bounds it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_bench}"
ITERS="${ITERS:-20}"
WARMUP="${WARMUP:-3}"
PER_MODEL_S="${PER_MODEL_S:-540}"
COMPARE_ARGS=(--compile-mode "${COMPILE_MODE:-default}")
[[ -n "${COMPARE:-}" ]] && COMPARE_ARGS+=(--compare "$COMPARE")
MODELS=("$@")
[[ ${#MODELS[@]} -eq 0 ]] && MODELS=(if-i-xl:random if-ii-l:random sd-x4-upscaler:random t5-xxl:random shapes)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source bench/gpu_wheels.sh
python3 -c "import diffusers, transformers" || { echo "diffusers/transformers missing: carry .whl (see above)"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/device.txt"
status=0
for model in "${MODELS[@]}"; do
    name="${model//:/_}"
    timeout --kill-after=10 "$PER_MODEL_S" python3 -m engine bench --model "$model" --device cuda --iters "$ITERS" \
        --warmup "$WARMUP" "${COMPARE_ARGS[@]}" --json "$OUT/bench_$name.json" \
        > "$OUT/bench_$name.md" 2> "$OUT/bench_$name.log" || { echo "$model: failed ($?)"; status=1; }
    cat "$OUT/bench_$name.md"
    tail -n 3 "$OUT/bench_$name.log"
done
exit "$status"
