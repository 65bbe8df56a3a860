#!/usr/bin/env bash
# emma-tiny's vision tower compared inside the model (issue 13): step 1 of the recipe
# (recipes/emma-tiny.yaml: concept-started projector, one LoRA stage, seed 0) cut to 150 steps, once per
# variant, each evaluated on VQA-RAD test and compared, paired, with Astra layer4 (the tower shipped when
# this comparison was made; the shipped model has since moved to EfficientNet-Lite0, MODEL_CARD.md):
#   lite0         EfficientNet-Lite0 (ImageNet) instead of Astra    base_model: emma-tiny:init:lite0
#   astra-l4-top  Astra layer4 (its last stage) trained, LR 3e-5    train_vision + vision_trainable
#   astra-l3      Astra cut after layer3: 14x14 = 196 image tokens  base_model: emma-tiny:init:astra-layer3
#   lite0-320     EfficientNet-Lite0 on 320 px images: 10x10 = 100  base_model: emma-tiny:init:lite0-320
# Needs the data of the recipe's header (runs/data/vqa-rad, runs/data/vqa-rad-facts) and
# ../shared/data/vqa-rad; about 15 min of training per variant on an idle 2-core CPU (layer3: longer).
# Usage: [BASE=lite0] bash scripts/compare_towers.sh [variant ...]   (default: the first three; the
# baseline, BASE or astra-l4, always runs first, and every variant is compared with it)
# Finished runs are skipped, so an interrupted comparison continues where it stopped.
set -euo pipefail

STEPS=150
DATA=../shared/data/vqa-rad
RECIPE=recipes/emma-tiny.yaml

declare -A SETS=(
    [astra-l4]="base_model=emma-tiny:init:astra"
    [lite0]="base_model=emma-tiny:init:lite0"
    [astra-l4-top]="base_model=emma-tiny:init:astra stages.0.train_vision=true stages.0.vision_trainable=[encoder.stages.3] stages.0.vision_learning_rate=3e-5"
    [astra-l3]="base_model=emma-tiny:init:astra-layer3"
    [lite0-320]="base_model=emma-tiny:init:lite0-320"
)
BASE=${BASE:-astra-l4}

run() {
    local name=$1 out=runs/train/cmp-$1 args=()
    for kv in ${SETS[$name]}; do args+=(--set "$kv"); done
    if [[ ! -f $out/vqa/stage_done.json ]]; then
        emma train --recipe "$RECIPE" --set "output_dir=$out" --set "stages.0.max_steps=$STEPS" "${args[@]}" --resume
    fi
    if [[ ! -f runs/eval/cmp-$name/results.json ]]; then
        # the baseline also answers with blank images: does any closed answer read the image?
        local ablate=()
        [[ $name == "$BASE" ]] && ablate=(--ablate blank)
        emma eval --task vqa-rad --data "$DATA" --model "$out/vqa/final" --out "runs/eval/cmp-$name" "${ablate[@]}"
    fi
}

variants=("$@")
[[ ${#variants[@]} -gt 0 ]] || variants=(lite0 astra-l4-top astra-l3)
[[ -n ${SETS[$BASE]+x} ]] || { echo "unknown baseline $BASE (known: ${!SETS[*]})" >&2; exit 2; }
run "$BASE"
for v in "${variants[@]}"; do
    [[ -n ${SETS[$v]+x} ]] || { echo "unknown variant $v (known: ${!SETS[*]})" >&2; exit 2; }
    run "$v"
    emma eval compare "runs/eval/cmp-$BASE" "runs/eval/cmp-$v"
done
