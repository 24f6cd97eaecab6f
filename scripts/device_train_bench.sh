#!/usr/bin/env bash
# Train the `bench` preset (target + eagle/padrec heads + the three PAD-Rec ablations) on a lent
# GPU and pack the artifacts into $OUT as <16 MiB parts. Run from the repo root on the device:
#   DATASET=Beauty PRESET=bench DEVICE=cuda TRAIN_BUDGET_S=240 bash scripts/device_train_bench.sh
# Inputs (prepared here by scripts/device_prepare_carry.sh): .devcarry/data/<DATASET>/ and
# .devcarry/<PRESET>-<DATASET>/ holding the catalog (the GPU image lacks the embedding model).
# Unpack here with: cat $NAME.tgz.part-* | tar xz -C artifacts/; tar xzf $NAME-ablations.tgz -C artifacts/
set -euo pipefail
DATASET=${DATASET:-Beauty}
PRESET=${PRESET:-bench}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/padrec-out}
NAME=$PRESET-$DATASET
A=.devcarry/$NAME
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PADREC_DATA_DIR=$PWD/.devcarry/data TQDM_MININTERVAL=20
mkdir -p "$OUT"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
start=$(date +%s)
# heads travel in bfloat16 (the CPU engines load them back into float32 exactly)
to_bf16() {
python3 - "$@" <<'PY'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
for d in map(Path, sys.argv[1:]):
    w = load_file(str(d / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in w.items()}, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text()); cfg["dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
PY
}
python3 -m padrec_vllm.cli build --dataset "$DATASET" --preset "$PRESET" --out "$A" --device "$DEVICE" \
  ${TRAIN_BUDGET_S:+--train-budget-s $TRAIN_BUDGET_S} ${NO_EVAL:+--no-eval}
echo "build done after $(( $(date +%s) - start )) s"
to_bf16 "$A/heads/eagle" "$A/heads/padrec"
cp "$A/build.json" "$OUT/"
# first the target and the two heads, so they come back even if the ablations run out of time
tar czf - --exclude='*.pt' --exclude="$NAME/heads/padrec-no-*" -C .devcarry "$NAME" | split -b 15m - "$OUT/$NAME.tgz.part-"
[ -n "${SKIP_ABLATIONS:-}" ] && { ls -la "$OUT"; echo "all done after $(( $(date +%s) - start )) s"; exit 0; }
python3 -m padrec_vllm.cli train-heads --artifacts "$A" --device "$DEVICE" \
  --heads padrec-no-item,padrec-no-step,padrec-no-gate
echo "ablations done after $(( $(date +%s) - start )) s"
to_bf16 "$A"/heads/padrec-no-*
cp "$A/build.json" "$OUT/"
tar czf "$OUT/$NAME-ablations.tgz" -C .devcarry "$NAME/heads/padrec-no-item" "$NAME/heads/padrec-no-step" "$NAME/heads/padrec-no-gate"
ls -la "$OUT"
echo "all done after $(( $(date +%s) - start )) s"
