#!/usr/bin/env bash
# Seed study of the draft heads on a lent GPU (scripts/head_seed_study.py), one process per variant
# side by side, for an existing target. Stage the inputs here first:
#   mkdir -p .devcarry/bench-Beauty && cp -r artifacts/bench-Beauty/{target,build.json,token_layout.json,tokenizer,catalog.jsonl} .devcarry/bench-Beauty/
#   (and .devcarry/data/Beauty from scripts/device_prepare_carry.sh)
# Then on the device, from the repo root:  STUDY_BUDGET_S=450 bash scripts/device_head_study.sh
# Back in $OUT: study.tgz (per-variant JSON, merged JSON, logs) and every trained head in
# bfloat16 as heads.tgz.part-* (unpack: cat heads.tgz.part-* | tar xz -C runs/).
set -uo pipefail
A=${A:-.devcarry/bench-Beauty}
OUT=${OUT:-/tmp/padrec-out}
SEEDS=${SEEDS:-0,1,2}
ABL_SEEDS=${ABL_SEEDS:-$SEEDS}  # seeds of the padrec-no-* ablations
USERS=${USERS:-2000}
VARIANTS=${VARIANTS:-eagle padrec padrec-no-item padrec-no-step padrec-no-gate}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3} MKL_NUM_THREADS=${OMP_NUM_THREADS:-3} PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PADREC_DATA_DIR=$PWD/.devcarry/data TQDM_MININTERVAL=30
W=/tmp/study
mkdir -p "$OUT" $W/json $W/logs
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'
start=$(date +%s)
for v in $VARIANTS; do
  seeds=$SEEDS; case $v in padrec-no-*) seeds=$ABL_SEEDS;; esac
  timeout "${STUDY_BUDGET_S:-450}" python3 scripts/head_seed_study.py --artifacts "$A" --variants "$v" \
    --seeds "$seeds" --users "$USERS" --device "${DEVICE:-cuda}" ${EXTRA:-} --heads-out $W/heads --json $W/json/study-$v.json \
    > $W/logs/$v.log 2>&1 &
done
wait
echo "study done after $(( $(date +%s) - start )) s"
grep -h "^\[study\]" $W/logs/*.log
python3 scripts/head_seed_study.py --merge $(ls $W/json/study-*.json) --json $W/json/study.json --plot $W/json/study.png
tar czf "$OUT/study.tgz" -C $W json logs
python3 - $W/heads/* <<'PY'
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
tar czf - -C $W heads | split -b 15m - "$OUT/heads.tgz.part-"
ls -la "$OUT"
echo "all done after $(( $(date +%s) - start )) s"
