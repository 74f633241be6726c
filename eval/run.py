"""Evaluate a method on MetaICL tasks over seeds.

    python eval/run.py --config configs/eval/class_to_class/mend.yaml checkpoint=out/finetune/...
    python eval/run.py --config configs/eval/class_to_class/icl.yaml data.limit=100

See mend/recipes/evaluate.py for the config and main(cfg).
"""

import sys

from mend.recipes.evaluate import cli

if __name__ == "__main__":
    sys.exit(cli())
