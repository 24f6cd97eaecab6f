#!/usr/bin/env bash
# Chain against tree drafting on a lent GPU: reference engine, float32 target, the bench heads.
# On a GPU a verify forward over a few dozen tokens costs about what one token costs, which is
# where trees pay (on the 2-core CPU they do not; docs/RESULTS.md). Stage the inputs here first:
#   mkdir -p .devcarry/bench-Beauty/heads && cp -r artifacts/bench-Beauty/{target,build.json,token_layout.json,tokenizer,catalog.jsonl} .devcarry/bench-Beauty/
#   cp -r artifacts/bench-Beauty/heads/{eagle,padrec} .devcarry/bench-Beauty/heads/
#   (and .devcarry/data/Beauty from scripts/device_prepare_carry.sh)
# Then on the device, from the repo root:  bash scripts/device_tree_bench.sh
# Back in $OUT: tree-bench-b<B>.json (and .png where matplotlib is installed) and the printed tables.
# Try it on CPU first: DEVICE=cpu USERS=4 BATCHES=1 bash scripts/device_tree_bench.sh
set -uo pipefail
A=${A:-.devcarry/bench-Beauty}
OUT=${OUT:-/tmp/padrec-out}
USERS=${USERS:-300}
METHODS=${METHODS:-ar,eagle,padrec,eagle:t8k3,padrec:t8k3,padrec:t16k4,padrec:t24k4,padrec:t16k4p0.02}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PADREC_DATA_DIR=${PADREC_DATA_DIR:-$PWD/.devcarry/data} TQDM_MININTERVAL=30
mkdir -p "$OUT"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'
start=$(date +%s)
for b in ${BATCHES:-1 8}; do
  plot=()
  python3 -c 'import matplotlib' 2>/dev/null && plot=(--plot "$OUT/tree-bench-b$b.png")
  timeout "${BUDGET_S:-240}" python3 -m padrec_vllm.cli bench --artifacts "$A" --engine reference \
    --device "${DEVICE:-cuda}" --methods "$METHODS" --users "$USERS" --batch-size "$b" \
    --json "$OUT/tree-bench-b$b.json" "${plot[@]}" 2>&1 | tr '\r' '\n' | grep -v "^bench \|Loading weights" | tail -20
done
ls -la "$OUT"
echo "all done after $(( $(date +%s) - start )) s"
