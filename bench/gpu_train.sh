#!/usr/bin/env bash
# One device call: continue training the packaged shapes cascade on a GPU, then score it with the quality gate.
#
# Stage I trains in two variants side by side (batch 256 and 512; a small U-Net leaves the GPU mostly idle, so
# three processes share it), stage II once; both stage I variants get the same stage II. Each is scored by
# `python -m engine eval` on 256 held-out captions; the trained cascades come back as model_a.tgz / model_b.tgz.
#
# Here, once:  bash bench/gpu_checks.sh --fetch-wheels    (diffusers is not on the GPU machine)
# Device:      run(command="bash bench/gpu_train.sh", carry=[".whl"])
# MINUTES (default 6.5) is each stage's training budget: the whole call takes up to 1.15 times it (a stage past
# that stops and saves: the step time measured at its start under-counted the other processes' share of the
# GPU by about 25% on the first run) plus about 1.5 minutes.
# FROM (default the packaged model) is the cascade to continue from; VARIANTS=a trains one stage I variant only;
# LR is the peak learning rate.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_train}"
MINUTES="${MINUTES:-6.5}"
DEVICE="${DEVICE:-cuda}"
COUNT="${COUNT:-256}"
FROM="${FROM:-engine/demo/models/shapes}"
VARIANTS="${VARIANTS:-a b}"
LR="${LR:-1e-3}"
WORK=/tmp/shapes_train
mkdir -p "$OUT/logs" "$WORK"
export PYTHONUNBUFFERED=1
source bench/gpu_wheels.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/logs/device.txt" || true
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
    | tee -a "$OUT/logs/device.txt"
for v in $VARIANTS; do rm -rf "$WORK/$v"; cp -r "$FROM" "$WORK/$v"; done

limit=$(python3 -c "print(int($MINUTES * 60 * 1.3 + 80))")  # the budget plus start-up; a stuck process cannot eat the call
common=(--device "$DEVICE" --steps 1000000 1000000 --minutes "$MINUTES" --threads 4 --lr "$LR")
timeout --kill-after=10 "$limit" python3 -m engine.demo.train "$WORK/a" --stage II --batch 256 128 "${common[@]}" > "$OUT/logs/a_II.log" 2>&1 &
timeout --kill-after=10 "$limit" python3 -m engine.demo.train "$WORK/a" --stage I --batch 256 128 "${common[@]}" > "$OUT/logs/a_I.log" 2>&1 &
[[ " $VARIANTS " == *" b "* ]] \
    && timeout --kill-after=10 "$limit" python3 -m engine.demo.train "$WORK/b" --stage I --batch 512 128 "${common[@]}" > "$OUT/logs/b_I.log" 2>&1 &
wait
for log in "$OUT"/logs/*_I*.log; do echo "== $log"; grep -v "^Loading" "$log" | tail -n 3; done
if [[ -d "$WORK/b" ]]; then
    cp "$WORK/a/stage_II/unet/"* "$WORK/b/stage_II/unet/"
    cp "$WORK/a/train_stage_II.json" "$WORK/b/" 2>/dev/null
fi

for v in $VARIANTS; do
    python3 -m engine eval --model "$WORK/$v" --count "$COUNT" --device "$DEVICE" --dtype float32 --json "$OUT/logs/eval_$v.json" \
        2>&1 | grep -v "^Loading" | tail -n 2
    tar czf "$OUT/model_$v.tgz" -C "$WORK" "$v"
done
