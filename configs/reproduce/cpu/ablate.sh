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
# The task-level control: each stage-1 distiller (and ICL, the reference) on the demo's four
# unseen tasks, with their own and with another task's 16 demonstrations
# (configs/reproduce/cpu/eval-demo.yaml, as run.sh's demo_tasks).
python -c "from mend.data.demo import materialize; materialize('out/demo-tasks')"
demo_eval() {  # demo_eval OUTDIR ARGS...
  local dir=$1; shift
  [ -f "$dir/results.json" ] || mend eval --config configs/reproduce/cpu/eval-demo.yaml \
    output_dir="$dir" "$@"
}
demo_eval out/ablate/icl-demo method=icl
for v in "${@:-paper norm kv}"; do
  out=out/ablate/$v
  # shellcheck disable=SC2086
  [ -f "$out/mend_config.json" ] || mend pretrain --config configs/reproduce/cpu/pretrain.yaml \
    train.max_steps=$STEPS train.save_every=50 train.warmup_steps=10 train.eval_every=50 \
    output_dir=$out ${VARIANTS[$v]}
  demo_eval "$out/eval-demo" method=mend checkpoint="$out" llm=null
done
runs=()
for v in "${@:-paper norm kv}"; do runs+=("out/ablate/$v"); done
mend controls "${runs[@]}" --reference out/ablate/icl-demo/results.json \
  --output out/ablate/ablation.md
