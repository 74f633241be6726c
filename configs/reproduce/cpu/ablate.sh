#!/usr/bin/env bash
# bash configs/reproduce/cpu/ablate.sh [VARIANT ...]
# Issue 14's stage-1 ablation: what makes the vectors carry their text, at equal steps (150,
# batch 4, 128-token WikiText-2 validation windows, bf16 where native, LoRA r = 8, l = 16).
# Each variant logs the content controls on held-out WikiText-2 test windows every 50 steps
# (metrics.jsonl, loss.png); run again to resume. Results: out/ablate/<variant>/.
set -euo pipefail
cd "$(dirname "$0")/../../.."
STEPS=${STEPS:-150}
paper="model.output=embeddings model.projection=always model.placeholder_init=random"
declare -A VARIANTS=(
  [paper]="$paper"                                      # the paper's vectors: Linear+Tanh
  [norm]="model.output=embeddings model.projection=auto model.vector_norm=match model.placeholder_init=random"
  [paper-ae]="$paper objective.reconstruct=1.0"         # + autoencoding (ICAE)
  [paper-lr]="$paper train.lr_multipliers.placeholders=10 train.lr_multipliers.projection=10"
  [kv]=""                                               # model.yaml: output kv (Gisting-style)
  [kv-ae]="objective.reconstruct=1.0"
)
for v in "${@:-paper norm kv}"; do
  out=out/ablate/$v
  [ -f "$out/mend_config.json" ] && { echo "done: $v"; continue; }
  # shellcheck disable=SC2086
  mend pretrain --config configs/reproduce/cpu/pretrain.yaml train.max_steps=$STEPS \
    train.save_every=50 train.warmup_steps=10 train.eval_every=50 output_dir=$out ${VARIANTS[$v]}
done
