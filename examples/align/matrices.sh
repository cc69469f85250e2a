#!/usr/bin/env bash
# The 3-seed preference-accuracy matrices of docs/align.md: six methods, two months of first sentences of reviews
# (examples/align/make_months.py), the packaged SmolLM2-135M-Instruct, offline on CPU. About 25 minutes a seed on
# 2 cores. Usage: bash examples/align/matrices.sh [OUT (default runs/align-matrices)] [SEEDS (default "1 2 3")]
set -euo pipefail
out=${1:-runs/align-matrices}
seeds=${2:-1 2 3}
[ -d "$out/months" ] || python examples/align/make_months.py --out "$out/months" --train 64 --test 64 --max-words 15
common=(--model smollm2 --round "film=$out/months/film" --round "restaurant=$out/months/restaurant"
        --max-steps 8 --replay.buffer-size 64 --no-export --no-progress --cache-dir "$out/cache")
for seed in $seeds; do
  # Month 1 (DPO, or LoRA-DPO for lora-*) is learnt once per seed and kept in --cache-dir.
  for method in dpo replay-dpo fip-dpo interp-dpo lora-dpo lora-fip-dpo; do
    case $method in lora-*) lr=5e-4 ;; *) lr=5e-5 ;; esac
    [ -f "$out/$method-s$seed/results.json" ] ||
      python -m fipjax.align "${common[@]}" --method "$method" --learning-rate "$lr" --seed "$seed" \
        --out "$out/$method-s$seed"
  done
done
python -m experiments.summarize "$out"/*-s*/results.json --baseline dpo
