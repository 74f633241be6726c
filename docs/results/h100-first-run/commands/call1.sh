set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu1/*.whl || exit 1
mkdir -p /tmp/m /tmp/shared && cp .gpu1/wheel_aa /tmp/m/ && cp -r .gpu1/data /tmp/shared/
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 MEND_CACHE=/tmp/mc HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, accelerate, peft; print(torch.__version__, transformers.__version__, accelerate.__version__, peft.__version__)"
timeout 480 python3 .gpus/smoke.py 2>&1 | grep -v "it/s\]" | tee $OUT/smoke.log | tail -40
