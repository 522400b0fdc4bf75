#!/usr/bin/env bash
# The measurements behind docs/geometry.md, on the embedded SmolLM2-135M (about an hour on 2 CPU cores).
# Steps whose output already exists are skipped, so an interrupted run resumes:  bash benchmarks/geometry_compare.sh [OUT]
set -euo pipefail
OUT=${1:-runs/geo}
SP=${SAFETYPATCH:-.venv/bin/safetypatch}
DATA=${SAFETYPATCH_DATA:-../shared/data}
mkdir -p "$OUT"
step() { local done_file=$1; shift; if [ -e "$done_file" ]; then echo "== skip (done): $*"; else echo "== $*"; "$@"; fi; }

# 1. the default patch (rank 4, LDA-initialised A, up_proj of the middle third), as `make demo` trains it
step "$OUT/demo/summary.json" "$SP" demo --out "$OUT/demo"
# 2. the papers' plain LoRA at three ranks: PEFT's init, A and B trained, alpha = 2r, one epoch
for r in 1 8 64; do
  step "$OUT/r$r/patch/patch.json" "$SP" train --out "$OUT/r$r" --rank $r --alpha $((2 * r)) --init default \
    --freeze-a false --epochs 1 --eval-every 0
done
# 3. full fine-tuning of the same middle layers on the same data (every weight of those layers moves)
step "$OUT/full/model/config.json" "$SP" train --out "$OUT/full" --method full --layers middle --lr 2e-5 \
  --epochs 1 --eval-every 0
# 4. the default recipe with the overlap regularizer (paper B) on the column side, and the default patch projected
#    off the top-32. (The default's A is frozen, so a row-side penalty ||dW V_k S_k|| can only fall by shrinking B:
#    with --overlap-side both, beta 1, dev harmful refusal stayed at the base model's 8 % for 150 steps.)
step "$OUT/reg/patch/patch.json" "$SP" train --out "$OUT/reg" --overlap-beta 1.0 --overlap-k 32 --overlap-side column
step "$OUT/proj/patch.json" "$SP" patch project "$OUT/demo/patch" --k 32 -o "$OUT/proj"
# 5. geometry of every update, then safety and utility with the same suite
patch_dir() { if [ "$1" = proj ]; then echo "$OUT/proj"; else echo "$OUT/$1/patch"; fi; }
for name in demo r1 r8 r64 reg proj; do
  step "$OUT/an-$name/geometry.json" "$SP" analyze --model default --patch "$(patch_dir $name)" --k 1,8,32 --out "$OUT/an-$name"
done
step "$OUT/an-full/geometry.json" "$SP" analyze --model default --finetuned "$OUT/full/model" --k 1,8,32 --out "$OUT/an-full"
for name in demo r1 r8 r64 reg proj; do
  step "$OUT/ev-$name/summary.json" "$SP" eval --suite benchmarks/geometry_suite.yaml --model default \
    --patch "$(patch_dir $name)" --out "$OUT/ev-$name" --data-root "$DATA" --no-db
done
step "$OUT/ev-full/summary.json" "$SP" eval --suite benchmarks/geometry_suite.yaml --model default \
  --finetuned "$OUT/full/model" --out "$OUT/ev-full" --data-root "$DATA" --no-db
python3 benchmarks/geometry_summary.py "$OUT"/an-* --module up_proj | tee "$OUT/summary-up_proj.txt"
