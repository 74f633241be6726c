"""Resume is exact, for every kind of stop: stage 1 and stage 2, one process and two under
``accelerate launch``, each killed (SIGKILL) after a step, inside a checkpoint's write and
inside an evaluation, and started again each time, reach the weights of a run never
interrupted bit for bit, with the same metrics lines (no step logged twice, none lost)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mend import tiny
from mend.core.distiller import WEIGHTS_FILE
from tests.support import launch, write_metaicl

TIMING = {"time", "tokens_per_s", "steps_per_s", "model_flops_per_s"}
"""What a log line says of the clock, which a resumed run cannot repeat."""


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Both stages' arguments on tiny models: 6 steps, a checkpoint and an evaluation every
    2 (stage 1: the held-out content controls; stage 2: model selection on dev)."""
    root = tmp_path_factory.mktemp("resume")
    text = root / "corpus.txt"
    text.write_text("\n".join(f"{i} {line}" for i in range(6)
                              for line in tiny.CORPUS.splitlines()) + "\n")
    model = [f"model.distiller={tiny.build(root / 'llama', 'llama', 'metaspace')}",
             f"model.llm={tiny.build(root / 'gpt2', 'gpt2', 'bytelevel', hidden=48)}",
             "model.num_placeholders=4", "model.max_distiller_length=256"]
    train = ["train.batch_size=2", "train.log_every=1", "train.lr=1e-3", "train.warmup_steps=1",
             "train.max_steps=6", "train.save_every=2", "train.eval_every=2",
             "train.progress=false", "train.keep_checkpoints=3"]
    data = write_metaicl(root / "metaicl", train=["t1", "t2"], test=["t3", "t4"])
    return root, {
        "pretrain": model + train + [f"data.path={text}", "data.max_length=48",
                                     "data.min_length=16", "data.shuffle_buffer=50",
                                     f"content.data.path={text}", "content.windows=2",
                                     "content.data.max_length=48",
                                     "content.data.min_length=16"],
        "finetune": model + train + [f"data.root={data}", "data.partition=part",
                                     "context.k=3", "train.patience=10"]}


def lines(run: Path) -> list[dict]:
    """The run's metrics lines, without what they say of the clock."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow  # subprocesses: five starts of each stage, on one process and on two
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_every_kind_of_kill_resumes_to_the_uninterrupted_weights(stages, stage, processes):
    root, args = stages
    config = None if processes == 1 else "multi_gpu.yaml"

    def start(out: Path, **kill):
        return launch(config, processes, args[stage] + [f"output_dir={out}"], root,
                      recipe=stage, **kill)

    whole, killed = root / f"{stage}-{processes}-whole", root / f"{stage}-{processes}-killed"
    done = start(whole)
    assert done.returncode == 0, done.stderr[-3000:]
    # After step 3 (checkpoint 2 on disk); inside step 4's checkpoint write; inside the
    # first evaluation of the next start (step 4's again); and then to the end.
    for kill in ({"kill_at": 3}, {"kill_in": ("save", 4)}, {"kill_in": ("eval", 1)}):
        cut = start(killed, **kill)
        assert cut.returncode != 0, (kill, cut.stderr[-2000:])
        saved = sorted(p.name for p in (killed / "checkpoints").iterdir())
        assert "step-00000004" not in saved and "step-00000002" in saved, (kill, saved)
    leftover = [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftover == [".tmp-step-00000004"]  # the write that was cut, never read
    done = start(killed)
    assert done.returncode == 0, done.stderr[-3000:]
    # The run's model (stage 2: the one selection kept), and the last checkpoint's state.
    last = Path("checkpoints") / "step-00000006"
    for name in (WEIGHTS_FILE, last / "model.safetensors"):
        mine, theirs = load_file(whole / name), load_file(killed / name)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert lines(killed) == lines(whole)
    starts = [json.loads(line)["start_step"] for line in (killed / "provenance.jsonl")
              .read_text().splitlines()]
    assert starts == [0, 2, 2, 2]
