#!/usr/bin/env bash
# One GPU, one command: the benchmark table at bert-base size in bfloat16 (sequence length 256, with the MFU of the
# training step), then the paper preset for a bounded number of steps, printing throughput and accuracy.
# Needs the hub (bert-base-uncased, yelp_review_full, imdb) unless MODEL and DATA_DIR point to local copies.
#   bash benchmarks/gpu.sh            # about 10 minutes on one H100
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-bert-base-uncased}
OUT=${OUT:-runs/gpu-$(date +%Y%m%d-%H%M%S)}
DATA_ARGS=()
[ -n "${DATA_DIR:-}" ] && DATA_ARGS=(--data-dir "$DATA_DIR")
mkdir -p "$OUT"
python -m benchmarks.run --model "$MODEL" --dtype bfloat16 --seq 256 --batch 32 --replay-batch 32 --repeats 10 \
  --sizes 8 16 32 --no-torch --json "$OUT/bench.json"
python -m experiments.yelp_imdb --method all --model "$MODEL" "${DATA_ARGS[@]}" --no-progress \
  --n-train-yelp 20000 --n-train-imdb 5000 --n-test 2000 --max-len 256 --batch-size 32 --replay-batch-size 32 \
  --eval-batch-size 128 --stage1-steps 600 --steps 150 --checkpoint-every 100000 --out "$OUT/yelp_imdb"
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
r = json.loads((out / "yelp_imdb" / "results.json").read_text())
for name, m in r["methods"].items():
  (y1, _), (y2, i2) = m["accuracy_matrix"]
  print(f"{name:18s} Yelp {y1:.3f} -> {y2:.3f}  IMDB {i2:.3f}  {m['steps_per_s']:.1f} steps/s")
PY
