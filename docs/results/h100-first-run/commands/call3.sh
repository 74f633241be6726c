# GPU call 3: make sure stage 1 left a model, stage 2 on class_to_class time-boxed, ICL anchors.
set -u
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 MEND_CACHE=/tmp/mc HF_HUB_OFFLINE=1
D=/tmp/shared/data
LORA="model.train_mode=lora model.lora_r=8 model.projection=always train.mixed_precision=bf16 train.batch_size=8 train.progress=false"
if [ ! -f /tmp/run/pre/mend_config.json ]; then
  last=$(ls /tmp/run/pre/checkpoints | sort | tail -1 | sed 's/step-0*//')
  echo "stage 1 was interrupted; finishing it at step $last"
  python3 -m mend.cli pretrain --config configs/pretrain/smollm2-wikitext.yaml data.path=$D/text/wikitext-2 $LORA \
    train.max_steps=$last train.warmup_steps=30 train.lr=3e-4 train.save_every=100 train.log_every=10 output_dir=/tmp/run/pre 2>&1 | tail -2
fi
FT=${FT:-600}
timeout -s TERM 390 python3 -m mend.cli finetune --config configs/finetune/class_to_class/smollm2.yaml data.root=$D/metaicl $LORA \
  train.max_steps=$FT train.lr=3e-4 train.warmup_steps=30 train.eval_every=100 train.save_every=100 train.log_every=10 \
  select.batch_size=128 init_from=/tmp/run/pre output_dir=/tmp/run/ft 2>&1 | grep -v "it/s\]" | tail -4
cp /tmp/run/ft/metrics.jsonl $OUT/ft_metrics.jsonl; cp /tmp/run/ft/loss.png $OUT/ft_loss.png 2>/dev/null
timeout 160 python3 -m mend.cli eval --config configs/eval/class_to_class/icl.yaml data.root=$D/metaicl 'data.seeds=[100,13,21]' \
  data.limit=300 'demo_sep="\n\n"' batch_size=128 output_dir=/tmp/run/icl 2>&1 | tail -20
cp /tmp/run/icl/results.json $OUT/icl_nn.json
