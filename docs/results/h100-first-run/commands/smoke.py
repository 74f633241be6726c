# GPU call 1: every job on tiny models (bf16), then stage-1/2 step time of a random model with
# SmolLM2-135M's exact shape (same speed as the real weights). Writes to $OUT.
import json, os, sys, time, traceback
import torch
from mend import tiny
from mend.config import load_config

OUT = os.environ["OUT"]
D = "/tmp/shared/data"
ok = {}

def step(name, fn):
    t = time.time()
    try:
        fn(); ok[name] = f"ok {time.time() - t:.1f}s"
    except Exception:
        ok[name] = "FAILED: " + traceback.format_exc()[-1500:]
    print(name, ok[name], flush=True)

dist = str(tiny.build("/tmp/tiny/llama", "llama", "metaspace"))
llm = str(tiny.build("/tmp/tiny/gpt2", "gpt2", "bytelevel", hidden=48))
model = [f"model.distiller={dist}", f"model.llm={llm}", "model.num_placeholders=4"]
from mend.recipes.pretrain import PretrainConfig, main as pretrain
from mend.recipes.finetune import FinetuneConfig, main as finetune
from mend.recipes.evaluate import EvalConfig, main as evaluate
from mend.recipes.efficiency import EfficiencyConfig, main as efficiency

step("pretrain-tiny", lambda: pretrain(load_config(PretrainConfig, None, model + [
    f"data.path={D}/text/wikitext-2", "data.documents=wikitext", "data.max_length=128",
    "train.max_steps=6", "train.batch_size=4", "train.mixed_precision=bf16",
    "train.gradient_checkpointing=true", "train.log_every=2", "output_dir=/tmp/s/pre"])))
step("finetune-tiny", lambda: finetune(load_config(FinetuneConfig, None, model + [
    f"data.root={D}/metaicl", "data.k=4", "train.max_steps=6", "train.batch_size=4",
    "train.eval_every=3", "train.mixed_precision=bf16", "select.batch_size=64",
    "init_from=/tmp/s/pre", "output_dir=/tmp/s/ft"])))
for m, src in [("icl", f"llm={llm}"), ("mend", "checkpoint=/tmp/s/ft")]:
    step(f"eval-{m}-tiny", lambda m=m, src=src: evaluate(load_config(EvalConfig, None, [
        f"method={m}", src, f"data.root={D}/metaicl", "data.seeds=[100]", "data.limit=20",
        "demos.mode=resample", f"output_dir=/tmp/s/eval-{m}"])))
step("efficiency-tiny", lambda: efficiency(load_config(EfficiencyConfig, None, [
    f"root={D}/metaicl", "task=ag_news", "queries=4", "output_dir=/tmp/s/eff",
    f"methods=[{{name: icl, llm: {llm}}}, {{name: mend, checkpoint: /tmp/s/ft}}]"])))

# A random model with SmolLM2-135M's config, with a tiny tokenizer (ids stay in its vocab).
import transformers as tf
cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
torch.manual_seed(0)
tf.AutoModelForCausalLM.from_config(cfg).save_pretrained("/tmp/randsmol")
tiny.tokenizer("bytelevel").save_pretrained("/tmp/randsmol")
rs = ["model.distiller=/tmp/randsmol", "model.llm=/tmp/randsmol", "model.num_placeholders=100",
      "model.train_mode=lora", "model.lora_r=8", "model.projection=always",
      "train.mixed_precision=bf16", "train.log_every=5", "train.save_every=1000", "train.progress=false"]
for bs in (8, 16):
    step(f"pretrain-randsmol-bs{bs}", lambda bs=bs: pretrain(load_config(PretrainConfig,
        "configs/pretrain/smollm2-wikitext.yaml", rs + [
        f"data.path={D}/text/wikitext-2", f"train.max_steps=25", f"train.batch_size={bs}",
        f"output_dir=/tmp/s/rs{bs}"])))
step("finetune-randsmol-bs8", lambda: finetune(load_config(FinetuneConfig,
    "configs/finetune/class_to_class/smollm2.yaml", rs + [
    f"data.root={D}/metaicl", "train.max_steps=20", "train.batch_size=8", "train.eval_every=0",
    "output_dir=/tmp/s/rsft"])))
timing = {}
for name in ("rs8", "rs16", "rsft"):
    p = f"/tmp/s/{name}/metrics.jsonl"
    if os.path.exists(p):
        rows = [json.loads(l) for l in open(p)]
        timing[name] = [{k: r.get(k) for k in ("step", "loss", "steps_per_s", "tokens_per_s")} for r in rows]
json.dump({"ok": ok, "timing": timing, "gpu": torch.cuda.get_device_name(0),
           "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30}, open(f"{OUT}/smoke.json", "w"), indent=1)
print(json.dumps(timing, indent=1))
