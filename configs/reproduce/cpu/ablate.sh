#!/usr/bin/env bash
# bash configs/reproduce/cpu/ablate.sh [VARIANT ...]
# Issue 14's stage-1 ablation: what makes the vectors carry their text, at equal steps (150,
# batch 4, 128-token WikiText-2 validation windows, bf16 where native). Each variant logs the
# content controls on held-out WikiText-2 test windows every 50 steps (metrics.jsonl,
# loss.png); run again to resume. Results: out/ablate/<variant>/.
set -euo pipefail
cd "$(dirname "$0")/../../.."
STEPS=${STEPS:-150}
declare -A VARIANTS=(
  [paper]=""                                                     # Linear+Tanh, unnormalised
  [norm]="model.projection=auto model.vector_norm=match"          # RMSNorm at embedding scale
  [paper-lr]="train.lr_multipliers.placeholders=10 train.lr_multipliers.projection=10"
  [paper-ae]="objective.reconstruct=1.0"                          # + autoencoding (ICAE)
  [kv]="model.output=kv model.projection=auto model.placeholder_init=vocab"  # Gisting-style
)
for name in "${@:-paper norm paper-ae paper-lr}"; do
  for v in $name; do
    out=out/ablate/$v
    [ -f "$out/mend_config.json" ] && { echo "done: $v"; continue; }
    # shellcheck disable=SC2086
    mend pretrain --config configs/reproduce/cpu/pretrain.yaml train.max_steps=$STEPS \
      train.save_every=50 train.warmup_steps=10 train.log_every=5 output_dir=$out ${VARIANTS[$v]}
  done
done
