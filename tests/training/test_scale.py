"""The scale path: what accelerate prepares under each engine (mend.training.engine), data
streams split by node, and 2-process CPU runs (gloo) through the shipped accelerate configs:
DDP, and FSDP2 killed and resumed, on the same weights."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mend import tiny
from mend.core.distiller import WEIGHTS_FILE
from mend.data.pretrain import PretrainData, TextDataConfig, documents
from mend.errors import BackboneError, ConfigError
from mend.training import engine
from tests.support import launch

ROOT = Path(__file__).resolve().parents[2]


class _Objective:
    """The least a Trainable needs: a module and a loss through it."""

    def __init__(self, module):
        self.module = module

    def loss(self, model, batch):
        return {"loss": model(batch)}

    def save_pretrained(self, path, state_dict=None):
        pass


# --------------------------------------------------------------------------------------------
# What accelerate prepares


def test_train_step_state_dict_holds_only_what_trains(make_distiller):
    distiller = make_distiller("llama", "gpt2", train_mode="lora", lora_r=2)
    step = engine.TrainStep(_Objective(distiller), shard_frozen=True)
    state = step.state_dict()
    trainable = {f"trained.{n}" for n, p in distiller.named_parameters() if p.requires_grad}
    assert set(state) == trainable  # no LLM weight, no LoRA base weight, no buffer
    assert any("lora_" in k for k in state) and "trained.placeholders" in state
    # The LLM's tied head (lm_head.weight is wte.weight) is left out under both names.
    assert not any(k.startswith("frozen.") for k in state)
    # Loading what it saved is strict-clean: the left-out weights come from the module.
    before = {k: v.clone() for k, v in distiller.llm.model.state_dict().items()}
    with torch.no_grad():
        state["trained.placeholders"] += 1.0
    result = step.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(distiller.placeholders, state["trained.placeholders"])
    after = distiller.llm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # A checkpoint written before TrainStep holds the trained module's own keys.
    legacy = {k[len("trained."):]: v - 1.0 for k, v in state.items()}
    assert not step.load_state_dict(legacy, strict=True).missing_keys
    assert torch.equal(distiller.placeholders, legacy["placeholders"])


def test_train_step_keeps_the_frozen_llm_in_eval_mode(make_distiller):
    distiller = make_distiller("llama", "gpt2")
    step = engine.TrainStep(_Objective(distiller), shard_frozen=True)
    step.train()
    assert step.trained.training and not distiller.llm.model.training
    assert not any(m.training for m in distiller.llm.model.modules())  # no dropout
    # Under DDP the LLM is not a submodule at all: every rank holds its own copy.
    assert len(engine.TrainStep(_Objective(distiller), shard_frozen=False).frozen) == 0
    # accelerate's TRANSFORMER_BASED_WRAP finds both models' layer classes here.
    assert {"LlamaDecoderLayer", "GPT2Block"} <= set(step._no_split_modules)


def test_sharding_refuses_what_it_cannot_shard(make_distiller, monkeypatch):
    from types import SimpleNamespace

    from mend.training.config import TrainConfig

    distiller = make_distiller("llama", "llama", distiller_hidden=32, llm_hidden=32,
                               output="kv", train_mode="lora", lora_r=2)
    fsdp = SimpleNamespace(state=SimpleNamespace(
        fsdp_plugin=SimpleNamespace(activation_checkpointing=True)))
    monkeypatch.setattr(engine, "engine_of", lambda accelerator: "fsdp")

    class OldStyle(_Objective):
        def save_pretrained(self, path):
            pass
    with pytest.raises(ConfigError, match="multi_gpu.yaml"):
        engine.check_shardable(OldStyle(distiller), fsdp, TrainConfig())
    with pytest.raises(ConfigError, match="fsdp_activation_checkpointing: false"):
        engine.check_shardable(_Objective(distiller), fsdp, TrainConfig())
    monkeypatch.setattr(distiller.llm.model, "is_loaded_in_8bit", True, raising=False)
    with pytest.raises(ConfigError, match="llm_8bit=false"):
        engine.check_shardable(_Objective(distiller), fsdp, TrainConfig())


def test_models_load_on_the_cpu_when_the_launch_shards_them(monkeypatch):
    from mend.core.backbones import pick_device

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert engine.load_device() == pick_device()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as accelerate launch sets it
    assert engine.launched_sharded() == "fsdp" and engine.load_device() == "cpu"
    with pytest.raises(ConfigError, match="llm_8bit=false"):  # before anything loads
        engine.load_device(llm_8bit=True)


def test_deepspeed_launch_without_deepspeed_names_the_install(monkeypatch):
    from mend import optional

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(optional, "available", lambda module: module != "deepspeed")
    with pytest.raises(BackboneError, match=r"pip install 'mend\[deepspeed\]'"):
        engine.check_launch()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    engine.check_launch()  # nothing asked of DeepSpeed, nothing needed


# --------------------------------------------------------------------------------------------
# The shipped accelerate configs, as accelerate reads them


@pytest.mark.parametrize("name, engine_name, machines", [
    ("single_gpu.yaml", "NO", 1), ("multi_gpu.yaml", "MULTI_GPU", 1), ("fsdp.yaml", "FSDP", 1),
    ("fsdp_multi_node.yaml", "FSDP", 2), ("deepspeed_zero3.yaml", "DEEPSPEED", 1)])
def test_accelerate_configs_resolve(name, engine_name, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / name
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.value == engine_name and cfg.num_machines == machines
    assert path.read_text().startswith("# ")  # opens with how to launch it
    if engine_name == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        # No layer class is named: TrainStep._no_split_modules supplies both models'.
        assert "fsdp_transformer_layer_cls_to_wrap" not in cfg.fsdp_config
    if machines > 1:
        assert cfg.machine_rank == 0 and cfg.main_process_ip and cfg.main_process_port
        assert "placeholder" in path.read_text()
    if engine_name == "DEEPSPEED":
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == 3 and ds["gradient_accumulation_steps"] == 1
        from accelerate.utils import DeepSpeedPlugin
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            pytest.skip("deepspeed is not installed: the config was read by accelerate, but "
                        "no DeepSpeedPlugin was built from it (pip install 'mend[deepspeed]')")
        plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"],
                                 gradient_accumulation_steps=ds["gradient_accumulation_steps"],
                                 gradient_clipping=ds["gradient_clipping"])
        assert plugin.deepspeed_config["zero_optimization"]["stage"] == 3


# --------------------------------------------------------------------------------------------
# Data streams by node


@pytest.mark.parametrize("layout", ["rows", "wikitext"])
def test_split_by_node_reads_each_document_once_and_keeps_every_example(tmp_path, layout):
    if layout == "wikitext":
        lines = [f" = Article {a} = \n" + "".join(f" {a} {line} \n" for line in
                                                  tiny.CORPUS.splitlines()) for a in range(7)]
    else:
        lines = [f"{i} {line}\n" for i in range(5) for line in tiny.CORPUS.splitlines()]
    path = tmp_path / "text.txt"
    path.write_text("".join(lines))
    cfg = TextDataConfig(path=str(path), documents=layout, max_length=24, min_length=8,
                         shuffle_buffer=10)
    tok = tiny.tokenizer("bytelevel")

    def run(rank, world):
        data = PretrainData(cfg, tok, [], seed=0, rank=rank, world=world)
        return [tuple(w) for w in data.windows(0)], data.counters.counts["documents"]
    whole, read = run(0, 1)
    parts = [run(r, 2) for r in range(2)]
    assert sorted(parts[0][0] + parts[1][0]) == sorted(whole)  # the same examples
    assert parts[0][1] + parts[1][1] == read and min(parts[0][1], parts[1][1]) > 0
    shares = [list(documents(cfg, r, 2)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(documents(cfg))  # each read once
    assert not set(shares[0]) & set(shares[1])


# --------------------------------------------------------------------------------------------
# Two processes on the CPU


@pytest.fixture(scope="module")
def scale_runs(tmp_path_factory):
    """Stage 1 on tiny models, 2 processes each: DDP straight through (its documents and
    windows traced), and FSDP2 SIGKILLed after step 3 and started again."""
    root = tmp_path_factory.mktemp("scale")
    text = root / "corpus.txt"
    text.write_text("\n".join(f"{i} {line}" for i in range(6)
                              for line in tiny.CORPUS.splitlines()) + "\n")
    args = [f"model.distiller={tiny.build(root / 'llama', 'llama', 'metaspace')}",
            f"model.llm={tiny.build(root / 'gpt2', 'gpt2', 'bytelevel', hidden=48)}",
            "model.num_placeholders=4", "model.max_distiller_length=256", f"data.path={text}",
            "data.max_length=48", "data.min_length=16", "data.shuffle_buffer=50",
            "train.batch_size=2", "train.log_every=1", "train.lr=1e-3", "train.warmup_steps=1",
            "train.max_steps=4", "train.save_every=2", "train.progress=false"]
    (root / "trace").mkdir()
    ddp = launch("multi_gpu.yaml", 2, args + [f"output_dir={root / 'ddp'}"], root,
                 trace=root / "trace")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    killed = launch("fsdp.yaml", 2, args + [f"output_dir={root / 'fsdp'}"], root, kill_at=3)
    assert killed.returncode != 0
    assert [p.name for p in (root / "fsdp" / "checkpoints").iterdir()] == ["step-00000002"]
    resumed = launch("fsdp.yaml", 2, args + [f"output_dir={root / 'fsdp'}"], root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    return root, args


@pytest.mark.slow  # subprocesses
def test_two_ddp_processes_read_their_own_documents(scale_runs):
    root, _ = scale_runs
    calls = [json.loads(line) for line in (root / "ddp" / "provenance.jsonl").read_text()
             .splitlines()]
    assert [(c["engine"], c["processes"]) for c in calls] == [("ddp", 2)]
    read = [[json.loads(line) for line in (root / "trace" / f"read-{r}.jsonl").read_text()
             .splitlines()] for r in range(2)]
    rows = [line for line in (root / "corpus.txt").read_text().splitlines()]
    assert sorted(read[0] + read[1]) == sorted(rows)  # every document read once, by one rank
    trained = [{tuple(json.loads(line)) for line in (root / "trace" / f"trained-{r}.jsonl")
                .read_text().splitlines()} for r in range(2)]
    assert trained[0] and trained[1] and not trained[0] & trained[1]
    # One LR schedule whatever the number of processes (accelerate would step it twice).
    lrs = [json.loads(line)["lr"] for line in (root / "ddp" / "metrics.jsonl").read_text()
           .splitlines()]
    assert lrs == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3, 0.0])


@pytest.mark.slow  # subprocesses
def test_fsdp_killed_and_resumed_reaches_the_ddp_weights(scale_runs):
    import torch.distributed.checkpoint as dcp

    root, _ = scale_runs
    fsdp, ddp = load_file(root / "fsdp" / WEIGHTS_FILE), load_file(root / "ddp" / WEIGHTS_FILE)
    assert fsdp.keys() == ddp.keys()
    for key in fsdp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-6)
    calls = [json.loads(line) for line in (root / "fsdp" / "provenance.jsonl").read_text()
             .splitlines()]
    assert [(c["start_step"], c["engine"], c["processes"]) for c in calls] == [
        (0, "fsdp", 2), (2, "fsdp", 2)]
    steps = [json.loads(line)["step"] for line in (root / "fsdp" / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == [1, 2, 3, 4]
    # The checkpoint is accelerate's sharded (DCP) one, and holds no frozen LLM weight.
    last = root / "fsdp" / "checkpoints" / "step-00000004"
    saved = dcp.FileSystemReader(str(last / "pytorch_model_fsdp_0")).read_metadata()
    keys = list(saved.state_dict_metadata)
    assert "model.trained.placeholders" in keys and not any("frozen" in k for k in keys)
    record = json.loads((last / "mend_engine.json").read_text())
    assert (record["engine"], record["processes"]) == ("fsdp", 2)
    # ... and the model it was taken of, which a resume checks before loading.
    shared = [k for k in ddp if k in record["shapes"]]
    assert shared and all(record["shapes"][k] == list(ddp[k].shape) for k in shared)
    assert record["config"]["num_placeholders"] == 4


@pytest.mark.slow  # subprocesses
def test_resuming_on_another_engine_or_number_of_processes(scale_runs):
    root, args = scale_runs
    out = [f"output_dir={root / 'fsdp'}", "train.max_steps=6"]
    # Another engine cannot read FSDP's shards: a clear error, and the checkpoint is kept.
    ddp = launch("multi_gpu.yaml", 2, args + out, root)
    assert ddp.returncode != 0 and "was written under fsdp" in ddp.stderr
    assert (root / "fsdp" / "checkpoints" / "step-00000004").is_dir()
    # Three processes: the shards would reload, but each rank's share of the text is gone.
    three = launch("fsdp.yaml", 3, args + out, root)
    assert three.returncode != 0 and "Resume it with 2 processes" in three.stderr
    # Read round-robin, the same run goes on with three processes.
    rr = args + ["data.split_by_node=false"]
    first = launch("fsdp.yaml", 2, rr + [f"output_dir={root / 'rr'}"], root)
    assert first.returncode == 0, first.stderr[-3000:]
    more = launch("fsdp.yaml", 3, rr + [f"output_dir={root / 'rr'}", "train.max_steps=6"], root)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumes on 3" in more.stdout and "global batch 8" in more.stdout
    calls = [json.loads(line) for line in (root / "rr" / "provenance.jsonl").read_text()
             .splitlines()]
    assert [(c["start_step"], c["processes"]) for c in calls] == [(0, 2), (4, 3)]
    assert (root / "rr" / WEIGHTS_FILE).is_file()
    assert os.path.isdir(root / "rr" / "checkpoints" / "step-00000006")


@pytest.mark.slow  # subprocesses
def test_fsdp_stage2_selection_mixed_precision_and_activation_checkpointing(scale_runs):
    """Model selection reads a sharded model on every rank in step and saves the best from
    gathered weights; sharding from the main process's copy, bf16 and accelerate's activation
    checkpointing run sharded too."""
    from tests.support import write_metaicl

    root, args = scale_runs
    data = write_metaicl(root / "metaicl", train=["t1", "t2"], test=["t3", "t4"])
    stage2 = args[:4] + [f"data.root={data}", "data.partition=part", "context.k=3",
                         "train.max_steps=4", "train.batch_size=2", "train.eval_every=2",
                         "train.patience=10", "train.lr=5e-3", "train.progress=false"]
    for config in ("multi_gpu.yaml", "fsdp.yaml"):
        run = launch(config, 2, stage2 + [f"output_dir={root / ('stage2-' + config)}"], root,
                     recipe="finetune")
        assert run.returncode == 0, run.stderr[-3000:]
    evals = {config: [json.loads(line) for line in (root / f"stage2-{config}" / "metrics.jsonl")
                      .read_text().splitlines() if "eval_score" in line]
             for config in ("multi_gpu.yaml", "fsdp.yaml")}
    assert len(evals["fsdp.yaml"]) == 2 and evals["fsdp.yaml"] == evals["multi_gpu.yaml"]
    best = [load_file(root / f"stage2-{c}" / WEIGHTS_FILE) for c in ("multi_gpu.yaml",
                                                                      "fsdp.yaml")]
    for key in best[0]:
        torch.testing.assert_close(best[1][key], best[0][key], rtol=0, atol=1e-6)
    main_copy = launch("fsdp.yaml", 2, args + [f"output_dir={root / 'main-copy'}"], root,
                       flags=("--fsdp_cpu_ram_efficient_loading", "true"))
    assert main_copy.returncode == 0, main_copy.stderr[-3000:]
    shards = load_file(root / "main-copy" / WEIGHTS_FILE)  # the frozen LLM reached every rank
    for key, value in load_file(root / "ddp" / WEIGHTS_FILE).items():
        torch.testing.assert_close(shards[key], value, rtol=0, atol=1e-6)
    plain = launch("fsdp.yaml", 2, args + ["train.mixed_precision=bf16",
                                           f"output_dir={root / 'bf16'}"], root)
    ac = launch("fsdp.yaml", 2, args + ["train.mixed_precision=bf16",
                                        f"output_dir={root / 'bf16-ac'}"], root,
                flags=("--fsdp_activation_checkpointing", "true"))
    assert plain.returncode == 0 and ac.returncode == 0, ac.stderr[-3000:]
    losses = {name: [json.loads(line)["loss"] for line in (root / name / "metrics.jsonl")
                     .read_text().splitlines()] for name in ("bf16", "bf16-ac", "fsdp")}
    assert losses["bf16-ac"] == losses["bf16"]  # recomputing activations changes no number
    assert losses["bf16"] != losses["fsdp"]  # while bf16 does (fp32 master weights kept)
    for name in ("bf16", "bf16-ac"):
        assert '"mixed_precision": "bf16' in (root / name / "provenance.jsonl").read_text()


@pytest.mark.slow  # subprocesses
def test_deepspeed_zero3_one_process_killed_and_resumed(scale_runs):
    """Where DeepSpeed is installed, ZeRO-3 runs on its CPU accelerator, one process (its
    multi-process setup needs CUDA devices): killed and resumed, it reaches the weights of a
    run on one device, and its checkpoints hold no frozen weight."""
    pytest.importorskip("deepspeed", reason="pip install 'mend[deepspeed]' to run ZeRO-3")
    from mend.config import load_config
    from mend.recipes.pretrain import PretrainConfig
    from mend.recipes.pretrain import main as pretrain

    root, args = scale_runs
    out = [f"output_dir={root / 'zero3'}"]
    killed = launch("deepspeed_zero3.yaml", 1, args + out, root, kill_at=3)
    assert killed.returncode != 0
    resumed = launch("deepspeed_zero3.yaml", 1, args + out, root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    pretrain(load_config(PretrainConfig, None, args + [f"output_dir={root / 'one'}"]))
    zero3, one = load_file(root / "zero3" / WEIGHTS_FILE), load_file(root / "one" / WEIGHTS_FILE)
    for key in one:
        torch.testing.assert_close(zero3[key], one[key], rtol=0, atol=1e-6)
    last = root / "zero3" / "checkpoints" / "step-00000004"
    states = torch.load(next((last / "pytorch_model").glob("*model_states.pt")),
                        weights_only=False)
    assert "trained.placeholders" in states["param_shapes"][0]
    assert not any("frozen" in k for k in states["param_shapes"][0])
    assert not states["frozen_param_shapes"]
    assert json.loads((last / "mend_engine.json").read_text())["engine"] == "deepspeed"


# --------------------------------------------------------------------------------------------
# The end of a launched job


def test_a_finished_job_destroys_its_process_group_and_a_failed_one_leaves_it(tmp_path):
    """Left to interpreter shutdown, gloo's worker threads can abort a launched job that
    succeeded (SIGABRT); after an error another rank may still be in a collective."""
    from dataclasses import dataclass

    import torch.distributed as dist

    from mend.recipes.run import Recipe, run

    @dataclass
    class Job:
        steps: int = 1

    def fail(cfg):
        raise ConfigError("steps must be even")
    ran = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert run(Recipe(Job, fail), ["steps=3"]) == 2 and dist.is_initialized()
        assert run(Recipe(Job, lambda cfg: ran.append(cfg.steps)), ["steps=2"]) == 0
        assert ran == [2] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
