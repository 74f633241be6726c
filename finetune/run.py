"""Stage 2, meta-distillation finetuning on a MetaICL partition.

    accelerate launch finetune/run.py --config configs/finetune/class_to_class/gpt2-large.yaml \
        init_from=out/pretrain/gpt2-large
    python finetune/run.py --config configs/finetune/class_to_class/smollm2.yaml

See mend/recipes/finetune.py for the config and main(cfg).
"""

import sys

from mend.recipes.finetune import cli

if __name__ == "__main__":
    sys.exit(cli())
