#!/usr/bin/env bash
# Issue 7's runs at a 2-core-CPU budget: both training stages, the baselines, the ablations,
# the sweeps and the analyses on the zoo pair, then `mend report`. Run from the repository
# root:
#
#     bash configs/reproduce/cpu/run.sh            # everything, resuming what is done
#     bash configs/reproduce/cpu/run.sh main       # one part: stage1 main demo efficiency
#                                                  #   sweeps ablations analysis sweep_l budget
#                                                  #   distill report
#
# Every training command runs under a wall-clock limit (CALL_LIMIT seconds, as a device call
# would) and is started again until it finishes: a killed run resumes from its last
# checkpoint, which is the resume path this exercises. Evaluations already written are kept.
# Results are copied (results, configs, metrics, plots; no weights) to docs/results/paper-cpu.
set -euo pipefail

CFG=configs/reproduce/cpu
OUT=${OUT:-out/reproduce/cpu}
DOCS=${DOCS:-docs/results/paper-cpu}
CALL_LIMIT=${CALL_LIMIT:-600}
PARTITIONS=(class_to_class non_nli_to_nli hr_to_lr)

# train JOB OUTDIR MEND-ARGS...: run a training job to its end, one "call" at a time.
train() {
  local job=$1 dir=$2; shift 2
  local calls=0 rc=1
  # A call cut off by the limit exits 124 (or 143 when mend saw the SIGTERM) and is started
  # again; a finished run exits 0 (started again, it resumes at its last step and stops).
  # Model selection saves the best weights before the end, so their presence says nothing.
  until [ $rc -eq 0 ]; do
    calls=$((calls + 1))
    echo "== $dir: call $calls (limit ${CALL_LIMIT}s)"
    rc=0
    timeout -s TERM "$CALL_LIMIT" mend "$job" "$@" output_dir="$dir" || rc=$?
    [ $rc -eq 0 ] || [ $rc -eq 124 ] || [ $rc -eq 143 ] || return $rc
  done
  publish "$dir" metrics.jsonl config.yaml loss.png provenance.jsonl mend_config.json \
    prompt_tuning_config.json
}

# evaluate OUTDIR MEND-ARGS...: one evaluation, skipped when its results exist. A trained
# method (an argument checkpoint=...) reads its LLM from the checkpoint, so llm=null.
evaluate() {
  local dir=$1; shift
  local llm=()
  case " $* " in *" checkpoint="* | *" sweep.key=checkpoint "*) llm=(llm=null) ;; esac
  [ -f "$dir/results.json" ] || mend eval --config "$CFG/eval.yaml" "$@" ${llm[@]+"${llm[@]}"} \
    output_dir="$dir"
  publish "$dir" results.json results.md sweep.png
}

# publish DIR FILE...: copy the files that exist to the same place under $DOCS.
publish() {
  local dir=$1; shift
  local dest="$DOCS/${dir#"$OUT"/}"
  mkdir -p "$dest"
  for f in "$@"; do [ -f "$dir/$f" ] && cp "$dir/$f" "$dest/"; done
  return 0
}

stage1() {
  # CALL_LIMIT=150 here so that stage 1 is killed and resumed at least once.
  CALL_LIMIT=${STAGE1_CALL_LIMIT:-150} train pretrain "$OUT/pretrain" --config "$CFG/pretrain.yaml"
  train pretrain "$OUT/pretrain-clm" --config "$CFG/pretrain-clm.yaml"
}

main_table() {
  for p in "${PARTITIONS[@]}"; do
    train finetune "$OUT/$p/mend" --config "$CFG/finetune.yaml" data.partition="$p" \
      init_from="$OUT/pretrain"
    train finetune "$OUT/$p/hypertuning" --config "$CFG/finetune-no-distill.yaml" \
      data.partition="$p" init_from="$OUT/pretrain-clm"
    train finetune "$OUT/$p/prompt-tuning" --config "$CFG/prompt-tuning.yaml" data.partition="$p"
    evaluate "$OUT/$p/eval/zero_shot" method=zero_shot data.partition="$p"
    evaluate "$OUT/$p/eval/icl" method=icl data.partition="$p"
    evaluate "$OUT/$p/eval/prompt_tuning" method=prompt_tuning data.partition="$p" \
      checkpoint="$OUT/$p/prompt-tuning"
    evaluate "$OUT/$p/eval/hypertuning" method=hypertuning data.partition="$p" \
      checkpoint="$OUT/$p/hypertuning"
    evaluate "$OUT/$p/eval/mend" method=mend data.partition="$p" checkpoint="$OUT/$p/mend"
  done
}

# The analyses score the first $ALIMIT rows of each task (the main table: eval.yaml's 8), to
# fit the CPU budget; the report compares each with the run of the same method, rows and K
# (the K sweep's K = 4 point).
ALIMIT=${ALIMIT:-2}

demo_checkpoint() {
  # A class_to_class distiller (DEMO_RUN) becomes the demo's default (bf16: LoRA, placeholders
  # and projection in a few MB); `mend demo` then runs with what it finds by itself.
  local dir="$OUT/demo" asset=mend/assets/demo-distiller
  python -c "import torch; from mend import Distiller; Distiller.from_pretrained(
    '$OUT/${DEMO_RUN:-class_to_class/mend}').save_pretrained('$asset', dtype=torch.bfloat16)"
  [ -f "$dir/results.json" ] || mend demo output_dir="$dir"
  publish "$dir" results.json demo.png
}

efficiency() {
  # Cost does not depend on the weights, so the benchmark builds MEND with this run's l.
  local dir="$OUT/efficiency"
  # It exits 1 when one of issue 6's speed targets is missed; the table says which.
  [ -f "$dir/inference-cpu.json" ] || python bench/inference.py --device cpu --placeholders 16 \
    --ks 4,16,64 --queries 20 --batch-sizes 1,8 --out "$dir" --name inference-cpu || true
  publish "$dir" inference-cpu.json inference-cpu.md
}

sweeps() {
  local p=class_to_class
  evaluate "$OUT/$p/eval/sweep-k-icl" method=icl data.partition=$p data.limit="$ALIMIT" \
    sweep.key=context.k "sweep.values=[1,2,4]"
  evaluate "$OUT/$p/eval/sweep-k-mend" method=mend data.partition=$p data.limit="$ALIMIT" \
    checkpoint="$OUT/$p/mend" sweep.key=context.k "sweep.values=[1,2,4]"
}

analysis() {
  local p=class_to_class
  for kind in no_label no_input random_label wrong_label; do
    evaluate "$OUT/$p/eval/perturb-$kind-icl" method=icl data.partition=$p \
      data.limit="$ALIMIT" demos.perturbation=$kind
    evaluate "$OUT/$p/eval/perturb-$kind-mend" method=mend data.partition=$p \
      data.limit="$ALIMIT" checkpoint="$OUT/$p/mend" demos.perturbation=$kind
  done
  evaluate "$OUT/$p/eval/retrieval-bm25-icl" method=icl data.partition=$p \
    data.limit="$ALIMIT" demos.selection=bm25
  evaluate "$OUT/$p/eval/retrieval-bm25-mend" method=mend data.partition=$p \
    data.limit="$ALIMIT" checkpoint="$OUT/$p/mend" demos.selection=bm25
}

ablations() {
  local p=class_to_class
  train finetune "$OUT/$p/no-pretraining" --config "$CFG/finetune.yaml" data.partition=$p
  train finetune "$OUT/$p/clm-pretraining" --config "$CFG/finetune.yaml" data.partition=$p \
    init_from="$OUT/pretrain-clm"
  train finetune "$OUT/$p/no-pred" --config "$CFG/finetune-no-pred.yaml" data.partition=$p \
    init_from="$OUT/pretrain"
  train finetune "$OUT/$p/no-distill" --config "$CFG/finetune-no-distill.yaml" \
    data.partition=$p init_from="$OUT/pretrain"
  for run in no-pretraining clm-pretraining no-pred no-distill; do
    evaluate "$OUT/$p/eval/mend-$run" method=mend data.partition=$p data.limit="$ALIMIT" \
      checkpoint="$OUT/$p/$run"
  done
}

sweep_l() {
  # l changes the placeholders stage 1 learns, so the l sweep trains stage 2 from scratch
  # (l = 16 is the no-pretraining ablation's distiller).
  local p=class_to_class
  train finetune "$OUT/$p/no-pretraining-l4" --config "$CFG/finetune.yaml" data.partition=$p \
    model.num_placeholders=4
  evaluate "$OUT/$p/eval/sweep-l-mend" method=mend data.partition=$p data.limit="$ALIMIT" \
    checkpoint="$OUT/$p/no-pretraining" sweep.key=checkpoint "sweep.labels=['4','16']" \
    "sweep.values=[$OUT/$p/no-pretraining-l4,$OUT/$p/no-pretraining]"
}

budget() {
  # The same stage 2 trained 10x longer (400 steps), scored on the main table's rows and on
  # the analysis rows at K = 1, 2, 4 and with wrong labels: does MEND's dependence on its
  # demonstrations grow with training? (The report's "Training budget" table.)
  local p=class_to_class
  local run="$OUT/$p/mend-400"
  train finetune "$run" --config "$CFG/finetune.yaml" data.partition=$p \
    init_from="$OUT/pretrain" train.max_steps=400 train.warmup_steps=20 train.save_every=50
  evaluate "$OUT/$p/eval/long-mend" method=mend data.partition=$p checkpoint="$run"
  evaluate "$OUT/$p/eval/long-sweep-k-mend" method=mend data.partition=$p \
    data.limit="$ALIMIT" checkpoint="$run" sweep.key=context.k "sweep.values=[1,2,4]"
  evaluate "$OUT/$p/eval/long-perturb-wrong_label-mend" method=mend data.partition=$p \
    data.limit="$ALIMIT" checkpoint="$run" demos.perturbation=wrong_label
}

# demo_tasks OUTDIR MEND-ARGS...: one evaluation on the demo's four unseen tasks, with the swap
# control (eval-demo.yaml: 16 test rows each, K = 16 fixed demonstrations, newline separators).
demo_tasks() {
  local dir=$1; shift
  python -c "from mend.data.demo import materialize; materialize('out/demo-tasks')"
  [ -f "$dir/results.json" ] || mend eval --config "$CFG/eval-demo.yaml" output_dir="$dir" "$@"
  publish "$dir" results.json results.md
}

distill() {
  # Issue 14, does MEND carry its demonstrations? Stage 1 (long enough to be killed and
  # resumed), stage 2 on class_to_class twice (the paper's L_pred + L_distill, and L_distill
  # alone: L_pred can learn label priors into a constant prefix), prompt tuning (the
  # constant-prefix floor, given MEND's stage-2 wall time: PT_STEPS), each scored on
  # class_to_class and on the demo's tasks with the swap control, stage 1 alone as well; then
  # the controls table. DOCS=docs/results/distill-cpu.
  local p=class_to_class seeds=${DISTILL_SEEDS:-[100,13,21]}
  CALL_LIMIT=${STAGE1_CALL_LIMIT:-600} train pretrain "$OUT/pretrain" --config "$CFG/pretrain.yaml"
  train finetune "$OUT/$p/mend" --config "$CFG/finetune.yaml" data.partition=$p \
    init_from="$OUT/pretrain"
  train finetune "$OUT/$p/mend-distill-only" --config "$CFG/finetune-no-pred.yaml" \
    data.partition=$p init_from="$OUT/pretrain"
  train finetune "$OUT/$p/prompt-tuning" --config "$CFG/prompt-tuning.yaml" data.partition=$p \
    train.max_steps="${PT_STEPS:-1200}" train.eval_every=200 train.save_every=200
  demo_tasks "$OUT/demo-tasks/eval/icl" method=icl
  local run
  for run in pretrain $p/mend $p/mend-distill-only; do
    demo_tasks "$OUT/$run/eval-demo" method=mend checkpoint="$OUT/$run" llm=null
    evaluate "$OUT/$p/eval/${run##*/}" method=mend data.partition=$p checkpoint="$OUT/$run" \
      data.seeds="$seeds"
  done
  evaluate "$OUT/$p/eval/icl" method=icl data.partition=$p data.seeds="$seeds"
  evaluate "$OUT/$p/eval/prompt_tuning" method=prompt_tuning data.partition=$p \
    checkpoint="$OUT/$p/prompt-tuning" data.seeds="$seeds"
  evaluate "$OUT/$p/eval/zero_shot" method=zero_shot data.partition=$p data.seeds="$seeds"
  mend controls "$OUT/pretrain" "$OUT/$p/mend" "$OUT/$p/mend-distill-only" \
    --reference "$OUT/demo-tasks/eval/icl/results.json" --output "$OUT/$p/stage2-controls.md"
  publish "$OUT/$p" stage2-controls.md
}

ship() {
  # The distiller chosen from distill's runs (DEMO_RUN, a directory under $OUT; by default
  # the L_distill-only stage 2) becomes the demo's; the demo runs with it, and `mend diagnose` scores it on held-out text.
  DEMO_RUN=${DEMO_RUN:-class_to_class/mend-distill-only} demo_checkpoint
  mend diagnose mend/assets/demo-distiller output="$OUT/diagnose/diagnose.json"
  publish "$OUT/diagnose" diagnose.json
}

report() {
  mend report "$(dirname "$DOCS")"
}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(stage1 main demo efficiency sweeps ablations analysis sweep_l budget report)
for part in "${parts[@]}"; do
  case $part in
    stage1) stage1 ;;
    main) main_table ;;
    demo) demo_checkpoint ;;
    efficiency) efficiency ;;
    sweeps) sweeps ;;
    ablations) ablations ;;
    analysis) analysis ;;
    sweep_l) sweep_l ;;
    budget) budget ;;
    distill) distill ;;
    ship) ship ;;
    report) report ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
