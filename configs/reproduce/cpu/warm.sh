#!/usr/bin/env bash
# Issue 30 at a 2-core-CPU budget: the warm-started distiller (`output: compacted`, which is
# the training-free Attention Matching compaction at step 0) beside every training-free
# compaction at equal memory and the controls of generalise.sh, on the same five sets. Run
# from the repository root:
#
#     bash configs/reproduce/cpu/warm.sh                 # everything, keeping what is done
#     bash configs/reproduce/cpu/warm.sh stage1          # one part: references free stage1
#                                                        #   stage2 scored curve frontier report
#     STEP=150 bash configs/reproduce/cpu/warm.sh step_rows  # a kept stage-2 step, every set
#     STEP=150 REFINE_SETS=demo-long bash configs/reproduce/cpu/warm.sh refined  # it, refined
#     STEP_RUN=stage2-am-anneal STEP=50 bash configs/reproduce/cpu/warm.sh step_rows refined
#     bash configs/reproduce/cpu/warm.sh reselect        # the second selection, on dev rows
#     STEP_RUN=stage2-am-anneal STEP=50 bash configs/reproduce/cpu/warm.sh replicate  # a tie,
#                                                        #   on 32 rows a task
#     bash configs/reproduce/cpu/warm.sh ablate          # the ways to warm-start, one budget
#     WAY=kvzip-learned bash configs/reproduce/cpu/warm.sh way_stage2  # a way's stage 2
#     WAY=am bash configs/reproduce/cpu/warm.sh way_stage2  # stage 2 from step 0, no stage 1
#     RUN=stage2-am-anneal OWN_ROWS=0 TRAIN_ARGS="train.max_steps=150" WAY=am \
#       bash configs/reproduce/cpu/warm.sh way_stage2  # another schedule of the same way
#     RUN=stage2-am-long WAY_CONFIG=configs/reproduce/cpu/warm/finetune-long.yaml WAY=am \
#       bash configs/reproduce/cpu/warm.sh way_stage2  # the same way on long contexts
#     WAY=kvzip-learned bash configs/reproduce/cpu/warm.sh fit_on_top  # + the fit at eval
#     TRAIN_ARGS="..." bash configs/reproduce/cpu/warm.sh seeded  # seeded placeholders, and the mix
#     SHIP=RUN bash configs/reproduce/cpu/warm.sh ship   # RUN becomes the demo's distiller
#
# `references` copies what this setting shares with generalise-cpu (zero-shot, ICL, ICL at
# equal memory, prompt tuning, the distiller shipped before), run by the same configs and code
# paths; `free` scores every training-free compaction (kv_compress compaction=NAME);
# `stage1` and `stage2` train in the background-safe way of generalise.sh (killed once and
# resumed; each on a wall-clock budget, train.max_minutes); `scored` scores the trained rows
# (with the same positions' LoRA frozen: step 0 itself, and swapped demonstrations, as always);
# `curve` is the share on the demo's sets against tokens read over stage 2 (`mend curve`);
# `refined` the selected distiller refined at compress time (REFINE steps) on the demo's sets;
# `frontier` is the share against positions (l = 4, 8, 16) for every training-free row and
# the distiller. Results (no weights) go to docs/results/warm-cpu.
set -euo pipefail

OUT=${OUT:-out/warm}
DOCS=${DOCS:-docs/results/warm-cpu}
# shellcheck source=generalise.sh
source "$(dirname "$0")/generalise.sh"
CFG=configs/reproduce/cpu
WARM=$CFG/warm
GENERALISE=docs/results/generalise-cpu
read -r -a COMPACTIONS <<< "${COMPACTIONS:-kv_compress kvzip attention_matching kvzip_matching}"
AGAINST=${AGAINST:-attention_matching}  # `report`'s tables: each row's paired difference from it
WARM_RUN=${WARM_RUN:-$OUT/stage2}  # the distiller `frontier` scores at l = 4 and 8

references() {  # copy the rows shared with generalise-cpu, results and tables as they are
  # (the cut cache too, on the partitions, where `free` has not scored it here)
  local set run
  for set in demo demo-long "${PARTITIONS[@]}"; do
    for run in zero_shot icl icl-equal-memory kv_compress prompt_tuning prompt_tuning-mixture \
               mend stage1-600-mixture-answer; do
      [ -f "$GENERALISE/$set/eval/$run/results.json" ] || continue
      [ -f "$OUT/$set/eval/$run/results.json" ] && continue  # scored here (kv_compress: free)
      mkdir -p "$OUT/$set/eval/$run" "$DOCS/$set/eval/$run"
      cp "$GENERALISE/$set/eval/$run/"results.* "$OUT/$set/eval/$run/"
      cp "$GENERALISE/$set/eval/$run/"results.* "$DOCS/$set/eval/$run/"
    done
  done
}

# compaction_rows CONFIG OUTDIR ARGS...: every training-free compaction at bos + L positions.
compaction_rows() {
  local config=$1 out=$2 name tag=""; shift 2
  [ "$L" = 16 ] || tag="-$L"
  for name in "${COMPACTIONS[@]}"; do
    local compaction=${name/kv_compress/attention_cut}
    row "$config" "$out/$name$tag" method=kv_compress num_placeholders="$L" \
      compaction="$compaction" label="$compaction${tag:+ (bos + $L)}" "$@"
  done
}

free() { every_set compaction_rows; }

stage1() { train pretrain "$OUT/stage1" --config "$WARM/pretrain.yaml" "$@"; }

stage2() { train finetune "$OUT/stage2" --config "$WARM/finetune.yaml" init_from="$OUT/stage1" "$@"; }

scored() {  # the trained distiller (stage 2, once it finished), and stage 1 alone, on every set
  if [ -f "$OUT/stage2/done" ]; then every_set mend_row warm "$OUT/stage2"; fi
  every_set mend_row warm-stage1 "$OUT/stage1"
}

curve() {  # curve [RUN START]: the recovered share on the demo's sets against tokens read over
  # a stage 2 (RUN, default stage2): its start (START, the row of its init_from; stage 1's end,
  # warm-stage1, by default) and its kept steps every CURVE_EVERY steps (`mend export`ed)
  local run=${1:-stage2} start=${2:-warm-stage1} step name dir prefix
  prefix=$(row_of "$run")
  for step in "$OUT/$run/checkpoints"/step-*; do
    [ -d "$step" ] || continue  # no checkpoint yet: the glob is left as it is
    name=$(basename "$step")
    (( 10#${name#step-} % ${CURVE_EVERY:-150} == 0 )) || continue
    dir=$(exported "$run" "$name")
    mend_row "$prefix-$name" "$dir" "$CFG/eval-demo.yaml" "$OUT/demo/eval" "$SHORT"
    mend_row "$prefix-$name" "$dir" "$CFG/eval-demo.yaml" "$OUT/demo-long/eval" "$LONG"
  done
  mkdir -p "$DOCS/$run"
  mend curve "$OUT/$run" "$OUT"/demo{,-long}/eval/"$start"/results.json \
    "$OUT"/demo{,-long}/eval/"$prefix"-step-????????/results.json --output "$DOCS/$run/curve.png"
}

refined() {  # the warm distiller stage 2 kept (or its kept step STEP=N) + REFINE steps at
  # compress time, on the demo's sets (REFINE_SETS), beside the training-free start + the same
  # steps (the compaction's fitted biases are refined with its keys and values)
  local set tasks run=${STEP_RUN:-stage2} dir="$OUT/stage2" name="warm-refine$REFINE"
  if [ -n "${STEP:-}" ]; then
    name=$(printf "step-%08d" "$STEP")
    dir=$(exported "$run" "$name")
    name="$(row_of "$run")-$name-refine$REFINE"
  fi
  for set in ${REFINE_SETS:-demo demo-long}; do
    tasks=$SHORT; [ "$set" = demo ] || tasks=$LONG
    mend_row "$name" "$dir" "$CFG/eval-demo.yaml" "$OUT/$set/eval" refine_steps="$REFINE" "$tasks"
    row "$CFG/eval-demo.yaml" "$OUT/$set/eval/attention_matching-refine$REFINE" \
      method=kv_compress compaction=attention_matching num_placeholders="$L" \
      refine_steps="$REFINE" label="attention_matching + $REFINE refine steps" "$tasks"
  done
}

step_rows() {  # one kept step of a stage-2 run (STEP=N of STEP_RUN, default stage2) on every
  # set, `mend export`ed, as the row warm-step-N (warm-pred-step-N for the run stage2-pred)
  local run=${STEP_RUN:-stage2} name dir
  name=$(printf "step-%08d" "${STEP:?name the step: STEP=N}")
  dir=$(exported "$run" "$name")
  every_set mend_row "$(row_of "$run")-$name" "$dir"
}

reselect() {  # the second selection (select-dev.yaml, fixed before any candidate was scored on
  # it): the training-free start (Attention Matching), stage 1's end (stage 2's step 0) and
  # every 50th step of stage 2 (or of the run STEP_RUN, e.g. stage2-am) on the dev rows of
  # the three partitions' tasks, in one table with every candidate scored before
  local dir="$OUT/selection-dev" step name run=${STEP_RUN:-stage2}
  evaluate "$WARM/select-dev.yaml" "$dir/zero_shot" method=zero_shot
  evaluate "$WARM/select-dev.yaml" "$dir/icl" method=icl
  row "$WARM/select-dev.yaml" "$dir/attention_matching" method=kv_compress \
    compaction=attention_matching num_placeholders="$L" label=attention_matching
  mend_row warm-stage1 "$OUT/stage1" "$WARM/select-dev.yaml" "$dir"
  for step in "$OUT/$run/checkpoints"/step-*; do
    [ -d "$step" ] || continue  # no checkpoint yet: the glob is left as it is
    name=$(basename "$step")
    (( 10#${name#step-} % 50 == 0 )) || continue
    mend_row "$(row_of "$run")-$name" "$(exported "$run" "$name")" "$WARM/select-dev.yaml" "$dir"
  done
  mend compare "$dir"/*/results.json --against attention_matching \
    --output "$DOCS/selection-dev/compare.md"
}

replicate() {  # the one set where the kept step and the shipped distiller could not be told
  # apart (REPLICATE_SET, non_nli_to_nli: 31.5 against 32.1 on 8 rows a task), scored again on
  # the first 32 test rows a task, same seeds. The rule, fixed before any of these rows was
  # scored: the kept step (STEP of STEP_RUN) is shipped if its score here is at or above the
  # shipped distiller's; the other four sets stand as measured.
  local set=${REPLICATE_SET:-non_nli_to_nli} run=${STEP_RUN:?name the run: STEP_RUN=stage2-NAME}
  local rows=32 name dir out; name=$(printf "step-%08d" "${STEP:?name the step: STEP=N}")
  dir=$(exported "$run" "$name")
  out="$OUT/$set-$rows/eval"
  local args=("$CFG/eval.yaml" "$out" data.partition="$set" "data.seeds=[100,13]" data.limit=$rows)
  evaluate "$CFG/eval.yaml" "$out/zero_shot" method=zero_shot "${args[@]:2}"  # every share's
  evaluate "$CFG/eval.yaml" "$out/icl" method=icl "${args[@]:2}"                # references
  mend_row mend "$MEND" "${args[@]}"
  mend_row "$(row_of "$run")-$name" "$dir" "${args[@]}"
  L=16 compaction_rows "${args[@]}"
  mkdir -p "$DOCS/$set-$rows"
  mend compare "$out"/*/results.json --against mend --output "$DOCS/$set-$rows/compare.md"
}

ablate() {  # the ways to warm-start that a config reaches, each a stage 1 from LoRA at zero
  # on one wall-clock budget (ABLATE_MINUTES), scored on the demo's sets beside its own step 0
  # (the training-free row `free`/`frontier` scored) and the stage-1 run above:
  #   kvzip: selection inside the distiller, no fit (KV-Distill's way: KVzip's query-agnostic
  #          scorer picks the positions, the LoRA teaches them to carry the rest);
  #   am-4:  Attention Matching's fit on the distiller's cache at bos + 4 positions (l = 4);
  #   kvzip-learned: kvzip with a learned scorer (KV-Distill's learned selection), so that
  #          the two differ by the scorer alone.
  # Each trained at bos + 16 is also scored at bos + 4 (a compaction cuts to any budget).
  ablate_way kvzip 16 kvzip
  ablate_way am-4 4 attention_matching-4
  ablate_way kvzip-learned 16 kvzip
  local set
  for set in demo demo-long; do  # the learned scorer alone
    mend compare "$OUT/$set/eval"/ablate-kvzip{,-learned}/results.json \
      --against ablate-kvzip --output "$DOCS/ablate/scorer-$set.md"
  done
  # Their held-out content controls against tokens read, beside the stage-1 run's
  mend curve "$OUT/stage1" "$OUT"/demo{,-long}/eval/warm-stage1/results.json \
    --beside "$OUT"/ablate/{kvzip,am-4,kvzip-learned} --output "$DOCS/ablate/curve.png"
}

fit_on_top() {  # a way trained on kvzip's selection (WAY, default kvzip-learned): its stage 1
  # and, where it ran, its stage 2, scored with Attention Matching's fit on top of the trained
  # cache (compaction=kvzip_matching, the fifth way's fit at evaluation only) on the demo's
  # sets, beside the training-free kvzip_matching row it is at step 0
  local way=${WAY:-kvzip-learned} set tasks eval dir row rows
  for set in demo demo-long; do
    tasks=$SHORT; [ "$set" = demo ] || tasks=$LONG
    eval="$OUT/$set/eval"
    rows=("$eval/kvzip_matching/results.json")
    for row in "warm-$way-start" "warm-$way"; do
      [ -f "$eval/$row/results.json" ] || continue  # stage 2 not run
      dir=$(field_of "$eval/$row/results.json" models checkpoint)
      mend_row "$row-fit" "$dir" "$CFG/eval-demo.yaml" "$eval" compaction=kvzip_matching "$tasks"
      rows+=("$eval/$row/results.json" "$eval/$row-fit/results.json")
    done
    mkdir -p "$DOCS/ablate"
    mend compare "${rows[@]}" --against kvzip_matching --output "$DOCS/ablate/fit-$way-$set.md"
  done
}

# way_args NAME: an ablated way's config arguments, beside warm/model.yaml's.
way_args() {
  case $1 in
    kvzip) echo model.compaction=kvzip ;;
    am-4) echo model.num_placeholders=4 ;;
    kvzip-learned) echo model.compaction=kvzip model.learned_scorer=true ;;
    am) echo "" ;;  # model.yaml's own: Attention Matching's fit at bos + 16
    *) echo "unknown way: $1 (kvzip, am-4, kvzip-learned or am)" >&2; return 2 ;;
  esac
}

# ablate_way NAME L START: stage 1 of the way NAME (way_args) at bos + L positions, then its
# rows on the demo's sets, each beside START, the training-free row it starts from (at bos + 4
# too, START-4, for a way trained at bos + 16).
ablate_way() {
  local name=$1 l=$2 start=$3 dir="$OUT/ablate/$1" args
  read -r -a args <<< "$(way_args "$name")"
  train pretrain "$dir" --config "$WARM/pretrain.yaml" \
    train.max_minutes="${ABLATE_MINUTES:-25}" "${args[@]}"
  python -c "from mend.data.demo import materialize; materialize('out/demo-tasks')"
  ablate_rows "ablate-$name" "$dir" "$l" "$start"
  [ "$l" = 16 ] || return 0
  ablate_rows "ablate-$name-4" "$dir" 4 "$start-4"
}

seeded() {  # the last two ways (`output: kv`, `seeded_placeholders`): placeholders seeded from
  # the demonstrations' own tokens (seeded: all 16), and the mix of 8 seeded with 8 learned
  # placeholders (mix). Each is a stage 1 from LoRA and gates at zero on ablate's budget
  # (TRAIN_ARGS: more overrides, e.g. fp32), then its start (ablate-NAME-start: the LLM's own
  # cache of the seeded tokens, before any training) and its end on the demo's sets beside
  # Attention Matching, the bar (ablate/ablate-NAME-SET.md). At evaluation a seeded distiller
  # keeps its 16 positions: only a compacted cache cuts to another budget.
  local name m dir set tasks eval args extra
  read -r -a extra <<< "${TRAIN_ARGS:-}"
  python -c "from mend.data.demo import materialize; materialize('out/demo-tasks')"
  for name in ${SEEDED_WAYS:-seeded mix}; do
    case $name in
      seeded) m=16 ;;
      mix) m=8 ;;
      *) echo "unknown seeded way: $name (seeded or mix)" >&2; return 2 ;;
    esac
    dir="$OUT/ablate/$name"
    args=(model.output=kv "model.seeded_placeholders=$m")
    untrained "$dir-untrained" "${args[@]}"
    train pretrain "$dir" --config "$WARM/pretrain.yaml" \
      train.max_minutes="${ABLATE_MINUTES:-25}" "${args[@]}" "${extra[@]}"
    for set in demo demo-long; do
      tasks=$SHORT; [ "$set" = demo ] || tasks=$LONG
      eval="$OUT/$set/eval"
      mend_row "ablate-$name-start" "$dir-untrained" "$CFG/eval-demo.yaml" "$eval" "$tasks"
      mend_row "ablate-$name" "$dir" "$CFG/eval-demo.yaml" "$eval" "$tasks"
      mkdir -p "$DOCS/ablate"
      mend compare "$eval"/{attention_matching,"ablate-$name-start","ablate-$name"}/results.json \
        --against attention_matching --output "$DOCS/ablate/ablate-$name-$set.md"
    done
  done
}

way_stage2() {  # stage 2 of an ablated way (WAY, default kvzip-learned) on stage2's config and
  # budget, from that way's stage 1 (the run under ablate/ where this machine has it, else
  # its committed weights), as the run stage2-WAY; then that start (the row warm-WAY-start)
  # and the step selection kept (warm-WAY) on every set, and the curve on the demo's sets
  # over its kept steps every CURVE_EVERY (50). WAY=am is stage 2 with no stage 1: from the
  # training-free Attention Matching start itself (LoRA at zero), whose start row is scored
  # on the demo's sets only (the test says it is the attention_matching row on every set).
  # RUN=stage2-NAME names another run of the same way (e.g. another schedule in TRAIN_ARGS,
  # or another stage-2 config in WAY_CONFIG), whose rows are warm-NAME; OWN_ROWS=0 leaves
  # out the rows of its own selection, where the second selection (`reselect`, then
  # `step_rows`) picks the step instead.
  local way=${WAY:-kvzip-learned} init args extra start_sets=every_set
  local run=${RUN:-stage2-$way}
  read -r -a args <<< "$(way_args "$way")"
  if [ "$way" = am ]; then
    init="$OUT/ablate/am-untrained" start_sets=demo_sets
    untrained "$init" ${args[@]+"${args[@]}"}
  else
    init="$OUT/ablate/$way"
    [ -f "$init/done" ] || init="$DOCS/ablate/$way/weights"
  fi
  # TRAIN_ARGS: more overrides, e.g. fp32 where this CPU emulates bf16 (train.mixed_precision=
  # auto model.distiller_dtype=float32 model.llm_dtype=float32)
  read -r -a extra <<< "${TRAIN_ARGS:-}"
  train finetune "$OUT/$run" --config "${WAY_CONFIG:-$WARM/finetune.yaml}" init_from="$init" \
    ${args[@]+"${args[@]}"} ${extra[@]+"${extra[@]}"}
  $start_sets mend_row "warm-$way-start" "$init"
  CURVE_EVERY=${CURVE_EVERY:-50} curve "$run" "warm-$way-start"
  [ "${OWN_ROWS:-1}" = 0 ] || every_set mend_row "$(row_of "$run")" "$OUT/$run"
}

# untrained DIR ARGS...: the warm distiller of model.yaml (with ARGS) before any training, its
# LoRA at zero, saved as a checkpoint at DIR: a start that a stage 2 continues and rows score.
untrained() {
  local dir=$1; shift
  [ -f "$dir/mend_config.json" ] && return 0
  python - "$WARM/model.yaml" "$dir" "$@" <<'EOF'
import sys
from mend.config import config_data, from_dict
from mend.core.config import MendConfig
from mend.core.distiller import Distiller
model = from_dict(MendConfig, config_data(sys.argv[1], sys.argv[3:])["model"], "model")
Distiller.from_config(model, device="cpu").save_pretrained(sys.argv[2])
EOF
}

# ablate_rows ROW DIR L START: the distiller at DIR compacting to bos + L on the demo's sets,
# as ROW, with its paired difference from START (ablate/ROW-SET.md).
ablate_rows() {
  local row=$1 dir=$2 l=$3 start=$4 set tasks eval
  for set in demo demo-long; do
    tasks=$SHORT; [ "$set" = demo ] || tasks=$LONG
    eval="$OUT/$set/eval"
    mend_row "$row" "$dir" "$CFG/eval-demo.yaml" "$eval" num_placeholders="$l" "$tasks"
    mkdir -p "$DOCS/ablate"
    mend compare "$eval/$start/results.json" "$eval/$row/results.json" \
      --against "$(field_of "$eval/$start/results.json" label)" --output "$DOCS/ablate/$row-$set.md"
  done
}

# field_of RESULTS KEY...: one field of a results file (`label`, which `mend compare --against`
# names; `models checkpoint`, the distiller a row scored).
field_of() {
  python -c "import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2:]: v = v[k]
print(v)" "$@"
}

# row_of RUN: the row-name prefix of a stage-2 run's rows (stage2 -> warm, stage2-am-anneal ->
# warm-am-anneal), one spelling for curve, step_rows, refined, reselect, replicate, way_stage2
# and frontier; its step N's row is "$(row_of RUN)-step-N".
row_of() { echo "warm${1#stage2}"; }

# exported RUN STEP: the directory of RUN's kept step STEP (step-N) as a checkpoint, written
# by `mend export` the first time.
exported() {
  local dir="$OUT/$1/steps/$2"
  [ -d "$dir" ] || mend export "$OUT/$1/checkpoints/$2" "$dir" >&2
  echo "$dir"
}

frontier() {  # recovered share against positions: l = 4 and 8 (16 is in `free`)
  local l
  for l in 4 8; do
    L=$l every_set compaction_rows
    L=$l every_set equal_memory_icl
    L=$l every_set warm_at
  done
}

# warm_at CONFIG OUTDIR ARGS...: the trained distiller (WARM_RUN) compacting to bos + L
# positions (its budget is the compaction's, so one distiller serves every L), as the row
# warm-<run>-L; a run's exported step (RUN/steps/step-N) is named as step_rows names it.
warm_at() {
  local config=$1 out=$2 name; shift 2
  name="warm-$(basename "$WARM_RUN")"
  if [ "$(basename "$(dirname "$WARM_RUN")")" = steps ]; then
    name="$(row_of "$(basename "$(dirname "$(dirname "$WARM_RUN")")")")-$(basename "$WARM_RUN")"
  fi
  mend_row "$name-$L" "$WARM_RUN" "$config" "$out" num_placeholders="$L" "$@"
}

equal_memory_icl() {
  local config=$1 out=$2; shift 2
  row "$config" "$out/icl-equal-memory-$L" method=icl context.max_context_tokens="$L" \
    label="ICL at equal memory (bos + $L)" "$@"
}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(references free stage1 stage2 scored curve refined frontier report)
for part in "${parts[@]}"; do
  case $part in
    references) references ;;
    free) free ;;
    stage1) stage1 ;;
    stage2) stage2 ;;
    scored) scored ;;
    curve) curve ;;
    step_rows) step_rows ;;
    refined) refined ;;
    reselect) reselect ;;
    replicate) replicate ;;
    ablate) ablate ;;
    way_stage2) way_stage2 ;;
    fit_on_top) fit_on_top ;;
    seeded) seeded ;;
    frontier) frontier ;;
    ship) ship ;;
    report) report ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
