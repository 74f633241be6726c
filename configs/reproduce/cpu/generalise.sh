#!/usr/bin/env bash
# Issue 22 at a 2-core-CPU budget: every method beside the controls that could show it false,
# on the demo's four unseen tasks and on three MetaICL meta-test partitions. Run from the
# repository root:
#
#     bash configs/reproduce/cpu/generalise.sh            # everything, keeping what is done
#     bash configs/reproduce/cpu/generalise.sh demo       # one part: demo demo_long refine
#                                                         #   refine_curve partitions mixture
#                                                         #   mixture_answer prompt_tuning
#                                                         #   stage1_budget capacity report
#     SHIP=RUN bash configs/reproduce/cpu/generalise.sh ship  # RUN becomes the demo's distiller
#
# Each evaluation carries the swap control (content gap), its memory (demonstration tokens,
# prefix positions, compression) and, beside zero-shot and full ICL of the same tasks and
# seeds, its recovered share of ICL's gain. The equal-memory rows hold what MEND's prefix
# holds, bos + l = 17 positions: ICL cut to 16 tokens of whole demonstrations (the first cut
# if even it does not fit), and ICL's own KV cache cut to 17 positions per layer and head.
# MEND=DIR scores another distiller (default: the shipped one); PARTITIONS="a b" others.
# Results (results.json and .md, no weights) are copied to docs/results/generalise-cpu.
set -euo pipefail

CFG=configs/reproduce/cpu
OUT=${OUT:-out/generalise}
DOCS=${DOCS:-docs/results/generalise-cpu}
MEND=${MEND:-mend/assets/demo-distiller}
L=${L:-16}
REFINE=${REFINE:-20}
read -r -a PARTITIONS <<< "${PARTITIONS:-class_to_class non_nli_to_nli qa_to_qa}"

# evaluate CONFIG OUTDIR MEND-ARGS...: one evaluation, skipped when its results exist.
evaluate() {
  local config=$1 dir=$2; shift 2
  local llm=()
  case " $* " in *" checkpoint="*) llm=(llm=null) ;; esac
  [ -f "$dir/results.json" ] || mend eval --config "$config" "$@" ${llm[@]+"${llm[@]}"} \
    output_dir="$dir"
  local dest="$DOCS/${dir#"$OUT"/}"
  mkdir -p "$dest"
  cp "$dir/results.json" "$dir/results.md" "$dest/"
}

# row CONFIG OUTDIR ARGS...: `evaluate`, with the recovered share and the tables reading
# the zero-shot and ICL rows in OUTDIR's folder (`references` scores them first).
row() {
  local config=$1 dir=$2; shift 2
  local set; set=$(dirname "$dir")
  evaluate "$config" "$dir" references.zero_shot="$set/zero_shot/results.json" \
    references.icl="$set/icl/results.json" "$@"
}

# references CONFIG OUTDIR ARGS...: zero-shot and ICL, which every recovered share needs.
references() {
  local config=$1 out=$2; shift 2
  evaluate "$config" "$out/zero_shot" method=zero_shot "$@"
  evaluate "$config" "$out/icl" method=icl "$@"
}

# equal_memory CONFIG OUTDIR ARGS...: the two training-free rows that hold bos + L positions
# (named -L when L is not the shipped 16).
equal_memory() {
  local config=$1 out=$2 tag=""; shift 2
  [ "$L" = 16 ] || tag="-$L"
  row "$config" "$out/icl-equal-memory$tag" method=icl context.max_context_tokens="$L" \
    label="ICL at equal memory${tag:+ (bos + $L)}" "$@"
  row "$config" "$out/kv_compress$tag" method=kv_compress num_placeholders="$L" \
    label="kv_compress${tag:+ (bos + $L)}" "$@"
}

# methods CONFIG OUTDIR ARGS...: the references first, then the rest.
methods() {
  local config=$1 out=$2; shift 2
  references "$config" "$out" "$@"
  equal_memory "$config" "$out" "$@"
  row "$config" "$out/mend" method=mend checkpoint="$MEND" "$@"
}

# demo_sets FN [FN-ARGS...]: as every_set, on the demo's short and long tasks alone.
demo_sets() {
  python -c "from mend.data.demo import materialize; materialize('out/demo-tasks')"
  "$@" "$CFG/eval-demo.yaml" "$OUT/demo/eval" "$SHORT"
  "$@" "$CFG/eval-demo.yaml" "$OUT/demo-long/eval" "$LONG"
}

# every_set FN [FN-ARGS...]: FN FN-ARGS... CONFIG OUTDIR SET-ARGS... on the demo's short and
# long tasks and on each partition.
every_set() {
  local p
  demo_sets "$@"
  for p in "${PARTITIONS[@]}"; do
    "$@" "$CFG/eval.yaml" "$OUT/$p/eval" data.partition="$p" "data.seeds=[100,13]"
  done
}

# The demo's tasks with short demonstrations (demo/) and with long ones (demo-long/).
SHORT="data.tasks=[country_capital,country_language,animal_fruit,sentence_agent]"
LONG="data.tasks=[trip_capital,story_agent]"

demo() {
  python -c "from mend.data.demo import materialize; materialize('out/demo-tasks')"
  methods "$CFG/eval-demo.yaml" "$OUT/demo/eval" "$SHORT"
}

demo_long() {
  python -c "from mend.data.demo import materialize; materialize('out/demo-tasks')"
  methods "$CFG/eval-demo.yaml" "$OUT/demo-long/eval" "$LONG"
  row "$CFG/eval-demo.yaml" "$OUT/demo-long/eval/mend-refine$REFINE" method=mend \
    checkpoint="$MEND" refine_steps="$REFINE" label="MEND + $REFINE refine steps" "$LONG"
}

refine() {
  # Refinement at compress time, from the distiller's prefix and, as its training-free
  # control, from the KV cache cut to the same memory (one context per task: K = 16 fixed).
  row "$CFG/eval-demo.yaml" "$OUT/demo/eval/mend-refine$REFINE" method=mend \
    checkpoint="$MEND" refine_steps="$REFINE" label="MEND + $REFINE refine steps" \
    "$SHORT"
  row "$CFG/eval-demo.yaml" "$OUT/demo/eval/kv_compress-refine$REFINE" \
    method=kv_compress num_placeholders="$L" refine_steps="$REFINE" \
    label="KV cut + $REFINE refine steps" "$SHORT"
}

partitions() {
  local p
  for p in "${PARTITIONS[@]}"; do
    methods "$CFG/eval.yaml" "$OUT/$p/eval" data.partition="$p" "data.seeds=[100,13]"
  done
}

# distiller NAME DIR: a trained distiller on the demo's tasks (with refinement too) and on
# the partitions, beside the shipped one.
distiller() {
  local name=$1 dir=$2
  every_set references
  every_set mend_row "$name" "$dir"
  row "$CFG/eval-demo.yaml" "$OUT/demo/eval/$name-refine$REFINE" method=mend \
    checkpoint="$dir" refine_steps="$REFINE" label="$name + $REFINE refine steps" \
    "$SHORT"
}

# mend_row NAME DIR CONFIG OUTDIR ARGS...: the distiller at DIR, labelled NAME, on one set.
mend_row() {
  local name=$1 dir=$2 config=$3 out=$4; shift 4
  row "$config" "$out/$name" method=mend checkpoint="$dir" label="$name" "$@"
}

# train JOB DIR ARGS...: a training job to its end; the first call is cut at CUT seconds, so
# the run is killed and resumed once (a cut call exits 124, or 143 when mend saw the SIGTERM).
train() {
  local job=$1 dir=$2 rc=0 limit=${CUT:-600}; shift 2
  until [ -f "$dir/done" ]; do
    rc=0
    timeout -s TERM "$limit" mend "$job" "$@" output_dir="$dir" || rc=$?
    [ $rc -eq 0 ] && touch "$dir/done"
    [ $rc -eq 0 ] || [ $rc -eq 124 ] || [ $rc -eq 143 ] || return $rc
    limit=${CALL_LIMIT:-7200}
  done
  local dest="$DOCS/${dir#"$OUT"/}" f
  mkdir -p "$dest"
  for f in metrics.jsonl config.yaml loss.png provenance.jsonl; do
    [ -f "$dir/$f" ] && cp "$dir/$f" "$dest/"
  done
  return 0
}

# stage2 NAME CONFIG [INIT [ARGS...]]: a stage 2 continued from INIT (default: the shipped
# distiller, MEND), at about the wall time of issue 14's K = 16 class_to_class continuation
# (docs/results/distill-cpu/k16-continuation), then scored as `distiller` scores it.
stage2() {
  local name=$1 config=$2 init=${3:-$MEND}
  shift $(( $# < 3 ? $# : 3 ))
  train finetune "$OUT/$name" --config "$config" init_from="$init" "$@"
  distiller "$name" "$OUT/$name"
}

prompt_tuning() {
  # The best constant prefix trained on the same mixture, scored where every distiller is.
  local dir="$OUT/prompt-tuning-mixture" p
  train finetune "$dir" --config "$CFG/prompt-tuning-mixture.yaml"
  python -c "from mend.data.demo import materialize; materialize('out/demo-tasks')"
  row "$CFG/eval-demo.yaml" "$OUT/demo/eval/prompt_tuning" method=prompt_tuning \
    checkpoint="$dir" "$SHORT"
  row "$CFG/eval-demo.yaml" "$OUT/demo-long/eval/prompt_tuning" method=prompt_tuning \
    checkpoint="$dir" "$LONG"
  for p in "${PARTITIONS[@]}"; do
    row "$CFG/eval.yaml" "$OUT/$p/eval/prompt_tuning-mixture" method=prompt_tuning \
      checkpoint="$dir" data.partition="$p" "data.seeds=[100,13]" \
      label="prompt tuning (mixture)"
  done
}

stage1_budget() {
  # The stage-1 lever at about the CPU time of the shipped distiller's stage 1 + class_to_class
  # stage 2 + the mixture's: stage 1 twice as long (600 steps, 307k tokens, 1.1 passes over
  # WikiText-2 valid; the held-out share logged every 100), then the answer-distill mixture.
  train pretrain "$OUT/stage1-600" --config "$CFG/pretrain.yaml" train.max_steps=600 \
    train.mixed_precision=bf16
  stage2 stage1-600-mixture-answer "$CFG/finetune-mixture-answer.yaml" "$OUT/stage1-600"
}

capacity() {
  # The capacity lever at the shipped stage 1's budget: l = 32 placeholders from scratch (300
  # steps), then the answer-distill mixture; beside it, the equal-memory rows at its 33
  # positions, since a prefix twice as long is weighed against what fits in twice the memory.
  local l=32
  train pretrain "$OUT/stage1-l$l" --config "$CFG/pretrain.yaml" model.num_placeholders=$l \
    train.mixed_precision=bf16
  stage2 "l$l-mixture-answer" "$CFG/finetune-mixture-answer.yaml" "$OUT/stage1-l$l" \
    model.num_placeholders=$l
  L=$l every_set equal_memory
}

ship() {
  # The distiller chosen from these runs (SHIP, a run under $OUT) becomes the demo's default,
  # in bf16; the demo runs with it and `mend diagnose` scores it on held-out text
  # (run.sh's ship, its outputs under ship/).
  OUT="$OUT" DOCS="$DOCS/ship" DEMO_RUN="${SHIP:?name the run to ship}" bash "$CFG/run.sh" ship
}

refine_curve() {
  # The one-off cost against quality: MEND refined for 5 and 10 steps (20 in refine).
  local steps
  for steps in 5 10; do
    row "$CFG/eval-demo.yaml" "$OUT/demo/eval/mend-refine$steps" method=mend \
      checkpoint="$MEND" refine_steps="$steps" label="MEND + $steps refine steps" \
      "$SHORT"
  done
}

report() {
  local set
  for set in demo demo-long "${PARTITIONS[@]}"; do
    mkdir -p "$DOCS/$set"
    mend compare "$OUT/$set"/eval/*/results.json ${AGAINST:+--against "$AGAINST"} \
      --output "$DOCS/$set/compare.md"
  done
}

# Sourced (warm.sh reuses the helpers above), it stops here.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(demo demo_long refine refine_curve partitions mixture
                                  mixture_answer prompt_tuning stage1_budget capacity report)
for part in "${parts[@]}"; do
  case $part in
    demo) demo ;;
    demo_long) demo_long ;;
    refine) refine ;;
    refine_curve) refine_curve ;;
    mixture) stage2 mixture "$CFG/finetune-mixture.yaml" ;;
    mixture_answer) stage2 mixture-answer "$CFG/finetune-mixture-answer.yaml" ;;
    prompt_tuning) prompt_tuning ;;
    stage1_budget) stage1_budget ;;
    capacity) capacity ;;
    ship) ship ;;
    partitions) partitions ;;
    report) report ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
