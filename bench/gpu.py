"""Every GPU measurement in one command (``run``): the device tests, the training and
inference benches at the zoo shape and at a 7B shape, the 8-bit LLM's gradients, `mend demo`,
and a stage 1 killed and resumed. And the one prepared training call (``train``, in
``bench/gpu_train.py``): both stages on the real SmolLM2 weights, evaluated and bundled.

On this machine, before a device call (copies what the GPU machine lacks into an ignored
folder that the call carries; see docs/gpu.md)::

    python bench/gpu.py pack .gpu

On the GPU machine (one call of at most 8 minutes on one H100/H200; no network)::

    python3 bench/gpu.py run --device cuda --carried .gpu --out /tmp/r --bundle $OUT/gpu.tgz

And its dry run, which CI runs through tests/test_bench.py so that it cannot rot::

    python bench/gpu.py run --device cpu --tiny --out /tmp/r

Each step is a subprocess under its own time limit, so one failure or hang never costs the
rest. The steps' results go to ``<out>/gpu-<device>.{json,md}`` beside the benches' own files
(``train-<device>*``, ``eightbit-<device>``, ``inference-<device>*``; ``-tiny`` in a dry run),
each step's output to ``<out>/logs/``. Speed needs no trained weights, so the models are
random-init copies of SmolLM2-135M's shape (its config and tokenizer) and of Llama-2-7B's
(``bench/architectures``, with SmolLM2's tokenizer); `mend demo` runs the shipped distiller
over those random weights, which makes its times real and its accuracies meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ZOO_NAME = "smollm2-135m"
# The zoo directory's files that describe the model without its weights.
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "zoo.json")
# What the GPU image lacks (../shared/GPU.md): `datasets` (stage 1 streams its text through it)
# with the packages it needs, gguf (the real weights arrive as a GGUF file), and bitsandbytes
# for the 8-bit LLM.
WHEELS = ("datasets", "dill", "multiprocess", "xxhash", "fsspec", "gguf", "bitsandbytes>=0.50")


class Step(NamedTuple):
    name: str
    limit: int  # seconds on the GPU
    dry: int  # seconds in the dry run (tiny models on a 2-core CPU)
    what: str


# The GPU limits add up to 8 minutes, one call's budget with a minute to spare for its start.
STEPS = (
    Step("shapes", 45, 30, "random-init models of the zoo shape and a 7B shape"),
    Step("tests", 50, 180, "the device tests (MEND_TEST_DEVICE) on the CPU and this device"),
    Step("train", 75, 120, "bench/train.py at the zoo shape: eager fp32, bf16, compile, 8-bit"),
    Step("train-7b", 55, 120, "bench/train.py with the 7B-shaped frozen LLM: bf16, 8-bit"),
    Step("eightbit", 35, 120, "bench/eightbit.py: 20 steps through an 8-bit LLM vs bf16"),
    Step("inference", 40, 180, "bench/inference.py at the zoo shape, output kv"),
    Step("inference-7b", 40, 180, "bench/inference.py with the 7B-shaped LLM"),
    Step("demo", 55, 240, "mend demo (the shipped distiller over random weights: times only)"),
    Step("resume", 80, 40, "mend pretrain stopped at half its time, then resumed"),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    pack_p = verbs.add_parser("pack", help="gather what the GPU machine lacks into a folder")
    pack_p.add_argument("folder")
    pack_p.add_argument("--no-wheels", action="store_true",
                        help="skip the wheels (no PyPI here, or the target has them)")
    pack_p.add_argument("--weights", action="store_true",
                        help="also the zoo model's GGUF file, in chunks: FOLDER-w1, FOLDER-w2...")
    pack_p.add_argument("--tiny", action="store_true",
                        help="with --weights, a tiny model's weights instead (the dry run)")
    pack_p.add_argument("--chunk-mib", type=float, default=36.0,
                        help="a chunk's size: the repository, FOLDER and one chunk must fit "
                             "a command's 64 MiB")
    stage_p = verbs.add_parser("stage", help="copy carried chunk folders where `train` finds "
                                             "them, for a later command on the same machine")
    stage_p.add_argument("folders", nargs="+")
    stage_p.add_argument("--staged", default=str(gpu_train.STAGED),
                         help="where the chunks wait for `train` (kept while the machine is)")
    stage_p.add_argument("--carried-into", default=str(gpu_train.CARRIED),
                         help="where the folder `pack` made waits (pass it as --carried)")
    train_p = verbs.add_parser("train", help="the training call: both stages on the real "
                                             "weights, evaluated, bundled (bench/gpu_train.py)")
    train_p.add_argument("--device", default="cuda")
    train_p.add_argument("--tiny", action="store_true", help="tiny random models: the dry run")
    train_p.add_argument("--carried", required=True, help="the folder `pack` made")
    train_p.add_argument("--chunks", nargs="*", default=[],
                         help="chunk folders carried by this command (earlier ones staged)")
    train_p.add_argument("--staged", default=str(gpu_train.STAGED),
                         help="where `stage` left the earlier commands' chunks")
    train_p.add_argument("--config", default=str(ROOT / "configs/reproduce/cpu/warm/"
                                                        "pretrain.yaml"))
    train_p.add_argument("--finetune-config", default=str(ROOT / "configs/reproduce/cpu/warm/"
                                                                 "finetune.yaml"))
    train_p.add_argument("--set", nargs="*", default=[],
                         help="overrides for the device, e.g. train.batch_size=32 "
                              "data.max_length=256 (both stages)")
    train_p.add_argument("--minutes", default="3.5,2.5",
                         help="the wall-clock budget of stage 1 and of stage 2")
    train_p.add_argument("--eval-minutes", type=float, default=1.5,
                         help="the time limit of the evaluation, all sets and runs")
    train_p.add_argument("--out", required=True)
    train_p.add_argument("--work", default="/tmp/mend-gpu-train")
    run_p = verbs.add_parser("run", help="run every step")
    run_p.add_argument("--device", default="cuda")
    run_p.add_argument("--tiny", action="store_true", help="tiny random models: the dry run")
    run_p.add_argument("--carried", default=None, help="a folder `pack` made")
    run_p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    run_p.add_argument("--work", default="/tmp/mend-gpu", help="models, caches, checkpoints")
    run_p.add_argument("--steps", default=",".join(s.name for s in STEPS))
    run_p.add_argument("--bundle", default=None, help="also tar the results into this file")
    args = p.parse_args(argv)
    if args.verb == "pack":
        return pack(Path(args.folder), not args.no_wheels, args.weights, args.tiny,
                    args.chunk_mib)
    if args.verb == "stage":
        gpu_train.stage([Path(f) for f in args.folders], Path(args.staged),
                        Path(args.carried_into))
        return 0
    if args.verb == "train":
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        env = environment(args, work, Path(args.carried).resolve())
        return gpu_train.train(args, env, data_root(args))
    return run(args)


# --------------------------------------------------------------------------------------------
# pack: on the machine with the zoo, the data and PyPI


def pack(folder: Path, wheels: bool, weights: bool = False, tiny: bool = False,
         chunk_mib: float = 36.0) -> int:
    """Copy into ``folder``: the zoo model's config and tokenizer (no weights), the text and
    the MetaICL tasks the steps and the training call read (cut to what they read), and the
    wheels the GPU image lacks; with ``weights``, the real weights (or a tiny model's) in
    chunks beside it."""
    from mend.core.backbones import zoo_path

    folder.mkdir(parents=True, exist_ok=True)
    shape = folder / ZOO_NAME
    shape.mkdir(exist_ok=True)
    source = zoo_path(ZOO_NAME)
    for name in SHAPE_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, shape / name)
    for sub in ("text/wikitext-2", "metaicl/config"):
        if not (SHARED / sub).is_dir():
            raise SystemExit(f"{SHARED / sub} is missing: the steps read it (../shared/data).")
    shutil.copytree(SHARED / "text/wikitext-2", folder / "data/text/wikitext-2",
                    dirs_exist_ok=True)
    gpu_train.trim_metaicl(SHARED / "metaicl", folder / "data" / "metaicl")
    if weights:
        if tiny:
            from mend import tiny as tiny_models
            model = tiny_models.build(folder / "tiny-model", "llama", "metaspace", hidden=32)
            files = sorted(model.glob("*.safetensors"))
            parts = gpu_train.split(files[0], folder, chunk_mib)
            files[0].unlink()  # it travels in the chunks
        else:
            from mend.core import zoo
            parts = gpu_train.split(zoo.ZOO[ZOO_NAME].locate(folder), folder, chunk_mib)
        print(f"weights in {len(parts)} chunk folder(s): {', '.join(p.name for p in parts)}")
    if wheels:
        target = folder / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                        "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                        "manylinux_2_24_x86_64", "--platform",
                        "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                        "--platform", "any", "-d", str(target), *WHEELS], check=True)
        for wheel in target.glob("bitsandbytes-*.whl"):
            _slim_bitsandbytes(wheel)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"packed {folder} ({size / 2**20:.1f} MiB): carry it, e.g. carry=['{folder}']")
    return 0


def _slim_bitsandbytes(wheel: Path) -> None:
    """Keep only the CUDA 13.0 (and CPU) library of bitsandbytes' wheel (41 MiB -> about 4)."""
    import zipfile

    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename
            if name.endswith((".so", ".dll", ".dylib")) and not name.endswith(
                    ("_cuda130.so", "_cpu.so")):
                continue
            dst.writestr(item, src.read(name))
    slim.replace(wheel)


# --------------------------------------------------------------------------------------------
# run: on the GPU machine (or the CPU, as a dry run)


def run(args) -> int:
    out, work = Path(args.out), Path(args.work)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    carried = Path(args.carried).resolve() if args.carried else None
    env = environment(args, work, carried)
    device = args.device
    suffix = "-tiny" if args.tiny else ""
    wanted = set(args.steps.split(","))
    records = []
    for step in STEPS:
        if step.name not in wanted:
            continue
        limit = step.dry if args.tiny else step.limit
        began = time.perf_counter()
        status, detail = STEP_RUNNERS[step.name](args, env, work, out, limit, suffix)
        records.append({"step": step.name, "what": step.what, "status": status,
                        "seconds": round(time.perf_counter() - began, 1), "limit_s": limit,
                        **detail})
        print(json.dumps(records[-1]), flush=True)
        write_summary(args, out, records)  # as it goes: a call cut short keeps what ran
    if args.bundle:
        Path(args.bundle).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.bundle, "w:gz") as tar:
            tar.add(out, arcname="results")
    ok = all(r["status"] == "ok" for r in records)
    print(f"gpu: {sum(r['status'] == 'ok' for r in records)}/{len(records)} steps ok on "
          f"{device}", flush=True)
    return 0 if ok else 1


def environment(args, work: Path, carried: Path | None) -> dict[str, str]:
    """The steps' environment: the repository and any carried wheels importable, the zoo
    cache under ``work``, unbuffered output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MEND_CACHE": str(work / "cache"),
           "TOKENIZERS_PARALLELISM": "false"}
    paths = [str(ROOT)]
    if carried and (carried / "wheels").is_dir():
        site = work / "site"
        if not site.is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                            "--no-deps", "--no-compile", "--target", str(site),
                            *map(str, sorted((carried / "wheels").glob("*.whl")))], check=True)
        paths.append(str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    # A CUDA run exercises the GPU path; its tests add the CPU themselves.
    env.pop("ACCELERATE_USE_CPU", None)
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def data_root(args) -> Path:
    carried = Path(args.carried).resolve() / "data" if args.carried else None
    return carried if carried and carried.is_dir() else SHARED


def command(cmd: list[str], env: dict[str, str], limit: float, log: Path,
            stop_with: int = signal.SIGKILL) -> tuple[int | None, str]:
    """Run ``cmd`` for at most ``limit`` seconds (then ``stop_with``, SIGKILL 10 s later);
    ``(returncode or None when stopped, its output's last 2000 characters)``."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, stop_with)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    return code, log.read_text()[-2000:]


def status_of(code: int | None) -> str:
    return "ok" if code == 0 else "timeout" if code is None else f"failed (exit {code})"


def step_shapes(args, env, work, out, limit, suffix):
    """Random-init models: the zoo's SmolLM2 under ``$MEND_CACHE/zoo`` (so its zoo name
    resolves) and a Llama-2-7B shape with SmolLM2's tokenizer (in bf16, on the device)."""
    if args.tiny:
        return "ok", {"note": "tiny models: each bench builds its own"}
    source = (Path(args.carried) / ZOO_NAME) if args.carried else None
    script = SHAPES_SCRIPT.format(source=str(source) if source else "", zoo=ZOO_NAME,
                                  seven=str(ROOT / "bench" / "architectures" / "llama-2-7b"),
                                  work=str(work), device=args.device)
    code, tail = command([sys.executable, "-c", script], env, limit, out / "logs" / "shapes.log")
    return status_of(code), {"tail": tail[-300:]}


SHAPES_SCRIPT = """
import json, shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
from mend.core import zoo
from mend.core.backbones import zoo_path
target = zoo.cache_root() / "zoo" / "{zoo}"
if not (target / "zoo.json").is_file():
    source = Path("{source}") if "{source}" else zoo_path("{zoo}")
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, target / f.name)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target)).save_pretrained(target)
seven = Path("{work}") / "llama-2-7b-shape"
if not (seven / "config.json").is_file():
    small = json.loads((target / "config.json").read_text())
    config = AutoConfig.from_pretrained("{seven}", vocab_size=small["vocab_size"],
                                        bos_token_id=small["bos_token_id"],
                                        eos_token_id=small["eos_token_id"],
                                        pad_token_id=small.get("pad_token_id"))
    with torch.device("{device}"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(seven)
    for f in target.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, seven / f.name)
print("shapes ready")
"""


def bench(script: str, args, env, out, limit, name: str, extra: list[str]):
    cmd = [sys.executable, str(ROOT / "bench" / script), "--device", args.device, "--out",
           str(out), "--name", name, *(["--tiny"] if args.tiny else []), *extra]
    code, tail = command(cmd, env, limit, out / "logs" / f"{name}.log")
    return status_of(code), {"results": f"{name}.json", "tail": tail[-300:]}


def step_tests(args, env, work, out, limit, suffix):
    test_env = {**env, "MEND_TEST_DEVICE": args.device, "ACCELERATE_USE_CPU": "true"}
    code, tail = command([sys.executable, "-m", "pytest", "-q", "-m", "device", "-p",
                          "no:cacheprovider", str(ROOT / "tests")], test_env, limit,
                         out / "logs" / "tests.log")
    summary = tail.strip().splitlines()[-1] if tail.strip() else ""
    return status_of(code), {"summary": summary}


def train_args(args) -> list[str]:
    text = ["--text", str(data_root(args) / "text" / "wikitext-2" / "wiki.valid.tokens.gz")]
    if args.tiny:
        return ["--batch", "2", "--demo-tokens", "48", "--input-tokens", "24",
                "--finetune-batch", "2", "--finetune-demo-tokens", "48",
                "--placeholders", "4", "--steps", "2", "--recipes", "paper", "--repeats", "1",
                "--stages", "pretrain", *text]
    return ["--batch", "8", "--demo-tokens", "800", "--input-tokens", "300", "--placeholders",
            "100", "--finetune-batch", "8", "--finetune-demo-tokens", "800",
            "--finetune-input-tokens", "300", "--steps", "5", "--recipes", "paper", *text]


def step_train(args, env, work, out, limit, suffix):
    variants = "eager-fp32,new" if args.tiny else "eager-fp32,old,new,new+compile,8bit"
    return bench("train.py", args, env, out, limit, f"train-{args.device}{suffix}",
                 train_args(args) + ["--variants", variants, "--profile"])


def step_train_7b(args, env, work, out, limit, suffix):
    llm = [] if args.tiny else ["--llm", str(work / "llama-2-7b-shape")]
    variants = "new" if args.tiny else "new,8bit"
    return bench("train.py", args, env, out, limit, f"train-{args.device}-7b{suffix}",
                 train_args(args) + llm + ["--variants", variants])


def step_eightbit(args, env, work, out, limit, suffix):
    sizes = (["--batch", "2", "--demo-tokens", "48", "--input-tokens", "24", "--placeholders",
              "4", "--steps", "4"] if args.tiny else [])
    text = ["--text", str(data_root(args) / "text" / "wikitext-2" / "wiki.valid.tokens.gz")]
    return bench("eightbit.py", args, env, out, limit, f"eightbit-{args.device}{suffix}",
                 sizes + text)


def inference_args(args) -> list[str]:
    data = ["--data", str(data_root(args) / "metaicl")]
    if args.tiny:
        return data + ["--ks", "4", "--queries", "3", "--latency-queries", "1",
                       "--batch-sizes", "2", "--placeholders", "4"]
    return data + ["--ks", "4,16,64", "--queries", "32", "--latency-queries", "10",
                   "--batch-sizes", "1,8,32", "--placeholders", "16"]


def step_inference(args, env, work, out, limit, suffix):
    return bench("inference.py", args, env, out, limit, f"inference-{args.device}{suffix}",
                 inference_args(args) + ["--output", "kv"])


def step_inference_7b(args, env, work, out, limit, suffix):
    llm = [] if args.tiny else ["--llm", str(work / "llama-2-7b-shape")]
    return bench("inference.py", args, env, out, limit, f"inference-{args.device}-7b{suffix}",
                 inference_args(args) + llm)


def step_demo(args, env, work, out, limit, suffix):
    cmd = [sys.executable, "-m", "mend.cli", "demo", f"output_dir={work / 'demo'}",
           *(["--tiny", "queries=4", "cost_queries=2", "train_steps=4"] if args.tiny else [])]
    code, tail = command(cmd, env, limit, out / "logs" / "demo.log")
    detail = {"tail": tail[-300:]}
    results = work / "demo" / "results.json"
    if code == 0 and results.is_file():
        saved = json.loads(results.read_text())
        detail["demo_seconds"] = round(saved["wall_time_s"], 1)
    return status_of(code), detail


def step_resume(args, env, work, out, limit, suffix):
    """Stage 1 under a limit of half the step's time (SIGTERM, as a scheduler stops a job),
    then started again: it must resume from the checkpoint the first call saved."""
    run_dir = work / "stage1"
    shutil.rmtree(run_dir, ignore_errors=True)
    text = data_root(args) / "text" / "wikitext-2"
    cmd = [sys.executable, "-m", "mend.cli", "pretrain", "--config",
           str(ROOT / "configs" / "reproduce" / "cpu" / "pretrain.yaml"),
           f"data.path={text / 'wiki.valid.tokens.gz'}",
           f"content.data.path={text / 'wiki.test.tokens.gz'}", "train.max_steps=100000",
           "train.save_every=10", "train.eval_every=0", "train.mixed_precision=auto",
           f"output_dir={run_dir}"]
    if args.tiny:
        from mend import tiny
        model = str(tiny.build(work / "tiny-llama", "llama", hidden=32))
        cmd += [f"model.distiller={model}", f"model.llm={model}", "train.save_every=2"]
    log = out / "logs" / "resume.log"
    first, _ = command(cmd, env, limit / 2, log, stop_with=signal.SIGTERM)
    second, tail = command(cmd, env, limit / 2, log, stop_with=signal.SIGTERM)
    starts = []
    provenance = run_dir / "provenance.jsonl"
    if provenance.is_file():
        starts = [json.loads(line).get("start_step") for line in provenance.read_text().splitlines()
                  if line.strip()]
    resumed = len(starts) >= 2 and (starts[1] or 0) > 0
    detail = {"start_steps": starts, "first_call": status_of(first),
              "second_call": status_of(second), "tail": tail[-300:]}
    return ("ok" if resumed else "failed (no resume from a checkpoint)"), detail


STEP_RUNNERS = {"shapes": step_shapes, "tests": step_tests, "train": step_train,
                "train-7b": step_train_7b, "eightbit": step_eightbit, "inference": step_inference,
                "inference-7b": step_inference_7b, "demo": step_demo, "resume": step_resume}


def write_summary(args, out: Path, records: list[dict]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

    ns = argparse.Namespace(**{**vars(args), "name": f"gpu-{args.device}"
                               f"{'-tiny' if args.tiny else ''}", "out": str(out)})
    common.write(ns, "gpu", records, ["step", "status", "seconds", "limit_s", "what"],
                 notes=[f"{r['step']}: {r.get('summary') or r.get('start_steps') or ''}"
                        for r in records if r.get("summary") or r.get("start_steps")])


if __name__ == "__main__":
    raise SystemExit(main())
