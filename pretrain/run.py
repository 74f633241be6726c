"""Stage 1, meta-distillation pretraining.

    accelerate launch pretrain/run.py --config configs/pretrain/gpt2-large.yaml train.lr=5e-5
    python pretrain/run.py --config configs/pretrain/smollm2-wikitext.yaml

See mend/recipes/pretrain.py for the config and main(cfg).
"""

import sys

from mend.recipes.pretrain import cli

if __name__ == "__main__":
    sys.exit(cli())
