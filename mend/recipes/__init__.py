"""Entry points: a config dataclass and a thin ``main(cfg)`` per job.

``pretrain/run.py``, ``finetune/run.py`` and ``eval/run.py`` at the top of the repository,
and the ``mend`` command, all call these, so ``accelerate launch pretrain/run.py ...`` and
``mend pretrain ...`` run the same code. They live inside the package so that an installed
mend (not only a checkout) has them.

The machinery every job shares (its command line, its results and config files, the
distiller it continues from) is in :mod:`mend.recipes.run`.
"""
