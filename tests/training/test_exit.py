"""A multi-process run that finished its work exits 0, every time.

The gloo abort of issue 32 ("terminate called without an active exception", SIGABRT at exit
after a finished run) came about once in tens of launches, so one launch proves nothing: the
test launches the shortest FSDP job many times, under load when asked, and counts.

Marked ``soak`` (deselected by setup.cfg's addopts: about 10 s a launch on 2 cores) and
``slow`` (so ``-m "not slow"``, which replaces the addopts' selection, skips it too). Run it with
``python -m pytest -m soak tests/training/test_exit.py``; MEND_SOAK_LAUNCHES sets the count
(30 by default) and MEND_SOAK_LOAD=1 runs a busy loop on every core beside it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from mend import tiny
from tests.support import launch


def _spin() -> None:  # a second job on the cores, as when the abort was seen
    while True:
        pass


@pytest.mark.slow
@pytest.mark.soak
def test_every_finished_fsdp_launch_exits_zero(tmp_path):
    launches = int(os.environ.get("MEND_SOAK_LAUNCHES", "30"))
    text = tmp_path / "corpus.txt"
    text.write_text(tiny.CORPUS)
    args = [f"model.distiller={tiny.build(tmp_path / 'llama', 'llama', 'metaspace')}",
            f"model.llm={tiny.build(tmp_path / 'gpt2', 'gpt2', 'bytelevel', hidden=48)}",
            "model.num_placeholders=4", "model.max_distiller_length=256", f"data.path={text}",
            "data.max_length=48", "data.min_length=16", "train.batch_size=2",
            "train.max_steps=1", "train.save_every=1", "train.progress=false"]
    load = [multiprocessing.Process(target=_spin, daemon=True)
            for _ in range(os.cpu_count() or 1)] if os.environ.get("MEND_SOAK_LOAD") else []
    for p in load:
        p.start()
    codes = []
    try:
        for i in range(launches):
            done = launch("fsdp.yaml", 2, args + [f"output_dir={tmp_path / f'run-{i}'}"],
                          tmp_path)
            codes.append(done.returncode)
            if done.returncode != 0:
                print(done.stderr[-3000:])
    finally:
        for p in load:
            os.kill(p.pid, signal.SIGKILL)
    aborted = [i for i, c in enumerate(codes) if c != 0]
    print(f"{launches} launches, {len(aborted)} not 0: {[codes[i] for i in aborted]}")
    assert aborted == [], f"launches {aborted} of {launches} exited {[codes[i] for i in aborted]}"
