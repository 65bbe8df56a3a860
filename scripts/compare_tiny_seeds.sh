#!/usr/bin/env bash
# emma-tiny's whole two-step recipe (recipes/emma-tiny.yaml, then recipes/emma-tiny-v8b.yaml) once more per
# tower, with other seeds, to see whether the tower comparison (EfficientNet-Lite0, shipped as v8b, against
# Astra's CT ResNet-152, shipped before as v7b) holds beyond one training run. Each run is evaluated on
# VQA-RAD test and the two are compared, paired, by `emma eval compare` (Astra first).
# Needs the data of the recipe's header (runs/data/vqa-rad, runs/data/vqa-rad-facts) and ../shared/data/vqa-rad;
# about 26 min of training per tower on an idle 2-core CPU.
# Usage: bash scripts/compare_tiny_seeds.sh [SEED]   (default 10: step 1 uses SEED, step 2 SEED + 1)
# Finished runs are skipped, so an interrupted comparison continues where it stopped.
set -euo pipefail

SEED=${1:-10}
DATA=../shared/data/vqa-rad

run() {
    local tower=$1 one=runs/train/seed$SEED-$1 two=runs/train/seed$SEED-$1-b
    if [[ ! -f $one/vqa/stage_done.json ]]; then
        emma train --recipe recipes/emma-tiny.yaml --set "base_model=emma-tiny:init:$tower" \
            --set "seed=$SEED" --set "output_dir=$one" --resume
    fi
    if [[ ! -f $two/vqa/stage_done.json ]]; then
        emma train --recipe recipes/emma-tiny-v8b.yaml --set "base_model=$one/vqa/final" \
            --set "seed=$((SEED + 1))" --set "output_dir=$two" --resume
    fi
    if [[ ! -f runs/eval/seed$SEED-$tower/results.json ]]; then
        emma eval --task vqa-rad --data "$DATA" --model "$two/vqa/final" --out "runs/eval/seed$SEED-$tower"
    fi
}

run astra
run lite0
emma eval compare "runs/eval/seed$SEED-astra" "runs/eval/seed$SEED-lite0"
