# GPU call 4: MEND and same-format ICL on class_to_class, efficiency on GPU, bring the LoRA distiller back.
set -u
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 MEND_CACHE=/tmp/mc HF_HUB_OFFLINE=1
D=/tmp/shared/data
cp /tmp/run/ft/mend_config.json /tmp/run/ft/mend_weights.safetensors $OUT/
timeout 200 python3 -m mend.cli eval --config configs/eval/class_to_class/mend.yaml checkpoint=/tmp/run/ft data.root=$D/metaicl \
  'data.seeds=[100,13,21]' data.limit=300 batch_size=128 output_dir=/tmp/run/mend 2>&1 | tail -20
cp /tmp/run/mend/results.json $OUT/mend.json
timeout 160 python3 -m mend.cli eval --config configs/eval/class_to_class/icl.yaml data.root=$D/metaicl 'data.seeds=[100,13,21]' \
  data.limit=300 batch_size=128 output_dir=/tmp/run/icl_ws 2>&1 | tail -3
cp /tmp/run/icl_ws/results.json $OUT/icl_ws.json
timeout 120 python3 -m mend.cli efficiency --config configs/efficiency/smollm2.yaml root=$D/metaicl task=ag_news \
  'methods=[{name: zero_shot, llm: smollm2-135m}, {name: icl, llm: smollm2-135m}, {name: mend, checkpoint: /tmp/run/ft}]' \
  output_dir=/tmp/run/eff 2>&1 | tail -8
cp /tmp/run/eff/efficiency.json $OUT/
