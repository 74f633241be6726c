"""The GPU training call (``bench/gpu.py train``): stage 1 and then stage 2 of a training config
on the real SmolLM2-135M weights, each on a wall-clock budget, then `mend diagnose` and the
transfer evaluation of what it trained beside its controls, bundled into a few files: all in
one command of at most 9 minutes on one H100/H200, with no network.

The weights travel in chunks (the GGUF file is 94 MiB, a command carries at most 64 MiB),
made here by ``bench/gpu.py pack FOLDER --weights`` (``FOLDER`` with the wheels, the data and
the model's shape; ``FOLDER-w1``, ``FOLDER-w2``, ... with the chunks and a manifest of their
sha256), staged by each command but the last (``bench/gpu.py stage FOLDER-wK``), and joined
and checked by the last, which trains. docs/gpu.md gives the exact calls. Its dry run, which
CI runs (``--device cpu --tiny``), chunks a tiny model's weights file the same way.

What comes back (``--out``, at most 8 files): ``checkpoint.tgz`` (the trained distiller, in
bf16), ``results.json`` (the evaluation beside its controls, and the provenance: device,
tokens read, minutes per stage, tokens/s, MFU), each stage's ``metrics-*.jsonl`` and
``loss-*.png``, and ``logs.tgz``. The first line it prints is the tokens/s it reached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "configs" / "reproduce" / "cpu"
STAGED = Path("/tmp/mend-chunks")
"""Where each command but the last leaves its chunk; it outlives a command while the machine
stays warm."""
CARRIED = Path("/tmp/mend-carried")
"""Where an earlier command leaves the folder ``pack`` made (wheels, data, the model's shape),
so the last command carries only its chunk."""
H100_BF16 = 989.4e12
"""Dense bf16 peak FLOP/s of an H100 SXM (an H200's is the same)."""


# --------------------------------------------------------------------------------------------
# Chunks: a file split to travel, joined and checked where it arrives


def split(path: Path, prefix: Path, chunk_mib: float) -> list[Path]:
    """``path`` cut into ``prefix-w1``, ``prefix-w2``, ... folders of one chunk each, with a
    ``manifest.json`` naming the file, every part in order and every sha256."""
    data = path.read_bytes()
    size = int(chunk_mib * 2**20)
    parts = [data[i:i + size] for i in range(0, len(data), size)]
    manifest = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
                "parts": [{"name": f"part-{i:02d}", "sha256": hashlib.sha256(p).hexdigest(),
                           "bytes": len(p)} for i, p in enumerate(parts)]}
    folders = []
    for i, part in enumerate(parts):
        folder = prefix.parent / f"{prefix.name}-w{i + 1}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / f"part-{i:02d}").write_bytes(part)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
        folders.append(folder)
    return folders


def stage(folders: list[Path], into: Path = STAGED, carried: Path = CARRIED) -> None:
    """Leave carried folders on the machine for a later command: a chunk folder's parts (and
    manifest) in ``into``, the folder ``pack`` made at ``carried``."""
    into.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if (folder / "manifest.json").is_file():
            for f in folder.iterdir():
                shutil.copy(f, into / f.name)
        else:
            shutil.copytree(folder, carried, dirs_exist_ok=True)


def join(into: Path, out_dir: Path) -> Path:
    """The file the staged parts make, checked part by part and whole against the
    manifest; a missing or damaged part is named."""
    manifest = json.loads((into / "manifest.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / manifest["file"]
    whole = hashlib.sha256()
    with open(target, "wb") as f:
        for part in manifest["parts"]:
            path = into / part["name"]
            if not path.is_file():
                raise SystemExit(f"chunk {part['name']} of {manifest['file']} is missing: stage "
                                 f"every chunk folder first (bench/gpu.py stage).")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise SystemExit(f"chunk {part['name']} of {manifest['file']} is damaged.")
            whole.update(data)
            f.write(data)
    if whole.hexdigest() != manifest["sha256"]:
        raise SystemExit(f"{manifest['file']} joined does not match its sha256.")
    return target


def trim_metaicl(source: Path, target: Path, rows: int = 300) -> None:
    """What the call reads of MetaICL, small enough to carry: every partition's config and
    task config, and of each task its 16-shot train and dev files and the first ``rows`` of
    its test file (stage 2 caps a task's pool at 256 examples)."""
    import gzip

    shutil.copytree(source / "config", target / "config", dirs_exist_ok=True)
    for task in sorted(p for p in source.iterdir() if p.is_dir() and p.name != "config"):
        (target / task.name).mkdir(parents=True, exist_ok=True)
        for f in task.glob("*_16_*"):
            shutil.copy(f, target / task.name / f.name)
        for f in task.glob("*_test.jsonl*"):
            opener = gzip.open if f.suffix == ".gz" else open
            with opener(f, "rt", encoding="utf-8") as src:
                head = [line for _, line in zip(range(rows), src)]
            with gzip.open(target / task.name / f"{task.name}_test.jsonl.gz", "wt",
                           encoding="utf-8") as dst:
                dst.writelines(head)


# --------------------------------------------------------------------------------------------
# The call


def train(args, env: dict[str, str], data: Path) -> int:
    """Join the weights, train both stages, evaluate, bundle; see the module docs."""
    work, out = Path(args.work), Path(args.out)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    stage([Path(c) for c in args.chunks], Path(args.staged))
    model = _model(args, work, env)
    minutes = [float(m) for m in args.minutes.split(",")]
    text = data / "text" / "wikitext-2"
    common = [f"content.data.path={text / 'wiki.test.tokens.gz'}", "train.count_flops=true",
              "train.progress=false", *args.set]
    if model is not None:  # the dry run: its tiny model, and a small held-out control
        common += [f"model.distiller={model}", f"model.llm={model}", "content.windows=4"]
    runs = {"stage1": ["pretrain", "--config", args.config,
                       f"data.path={text / 'wiki.valid.tokens.gz'}"],
            "stage2": ["finetune", "--config", args.finetune_config,
                       f"data.root={data / 'metaicl'}", f"init_from={work / 'stage1'}"]}
    stages = {}
    for (name, cmd), budget in zip(runs.items(), minutes):
        t0 = time.time()
        code = _mend([*cmd, *common, f"train.max_minutes={budget}",
                      f"output_dir={work / name}"], env, budget * 60 + 90, logs / f"{name}.log")
        stages[name] = {**_throughput(work / name), "minutes": round((time.time() - t0) / 60, 2),
                        "exit": code}
    evaluation = _evaluate(args, env, work, data, model, logs)
    peak = H100_BF16 if args.device == "cuda" else _cpu_peak()
    for s in stages.values():
        s["mfu"] = s.pop("model_flops_per_s", 0.0) / peak
    summary = {"device": _device(args.device), "peak_flops": peak, "stages": stages,
               "evaluation": evaluation, "minutes": round((time.time() - began) / 60, 2),
               "config": args.config, "finetune_config": args.finetune_config,
               "overrides": args.set}
    _bundle(work, out, summary)
    first = stages["stage1"], stages["stage2"]
    print(f"tokens/s: stage 1 {first[0]['tokens_per_s']:.0f}, stage 2 "
          f"{first[1]['tokens_per_s']:.0f}; MFU {first[0]['mfu']:.1%} and {first[1]['mfu']:.1%} "
          f"of {peak / 1e12:.3g} TFLOP/s ({summary['device']})", flush=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "evaluation"}, indent=1))
    print(_table(evaluation))
    ok = all(s["exit"] == 0 for s in stages.values()) and evaluation.get("ok", False)
    return 0 if ok else 1


def _model(args, work: Path, env: dict[str, str]) -> str | None:
    """The joined weights made usable: the zoo's SmolLM2 converted from its GGUF (the configs
    then name it by its zoo name, so None), or, in a dry run, a tiny model's directory."""
    joined = join(Path(args.staged), work / "weights")
    if not args.tiny:
        script = (f"from mend.core.backbones import zoo_from_gguf; "
                  f"print(zoo_from_gguf('smollm2-135m', {str(joined)!r}))")
        subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=ROOT,
                       capture_output=True)
        return None
    model = work / "tiny-model"
    shutil.copytree(Path(args.carried) / "tiny-model", model, dirs_exist_ok=True)
    shutil.copy(joined, model / joined.name)
    return str(model)


def _mend(args: list[str], env: dict[str, str], limit: float, log: Path) -> int | None:
    """``mend ARGS`` for at most ``limit`` seconds (SIGTERM: the run saves and stops)."""
    with open(log, "a") as f:
        f.write(f"$ mend {' '.join(args)}\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", "mend.cli", *args], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            return None


def _throughput(run: Path) -> dict[str, float]:
    """A stage's median tokens/s and model FLOP/s over its log lines, and the tokens it
    read."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()] if (run / "metrics.jsonl").is_file() else []
    rows = [r for r in rows if "tokens_per_s" in r]
    if not rows:
        return {"tokens_per_s": 0.0, "model_flops_per_s": 0.0, "tokens": 0, "steps": 0}
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "model_flops_per_s": statistics.median(r.get("model_flops_per_s", 0.0)
                                                   for r in rows),
            "tokens": int(sum(r.get("tokens", 0) for r in rows)), "steps": rows[-1]["step"]}


# The transfer evaluation of issue 22 on the sets that fit a call: each beside zero-shot, ICL,
# ICL at equal memory, the training-free compactions at equal memory (the warm start's step 0
# among them), and every run's swapped demonstrations (the content gap).
SETS = {"demo": ["--config", str(CFG / "eval-demo.yaml"),
                 "data.tasks=[country_capital,country_language,animal_fruit,sentence_agent]"],
        "demo-long": ["--config", str(CFG / "eval-demo.yaml"),
                      "data.tasks=[trip_capital,story_agent]"],
        "class_to_class": ["--config", str(CFG / "eval.yaml"), "data.partition=class_to_class",
                           "data.seeds=[100,13]"]}
RUNS = {"zero_shot": ["method=zero_shot"], "icl": ["method=icl"],
        "icl-equal-memory": ["method=icl", "context.max_context_tokens=16"],
        "kv_compress": ["method=kv_compress", "compaction=attention_cut"],
        "attention_matching": ["method=kv_compress", "compaction=attention_matching"]}


def _evaluate(args, env, work: Path, data: Path, model: str | None, logs: Path) -> dict:
    trained = work / "stage2" if (work / "stage2" / "mend_config.json").is_file() else \
        work / "stage1"
    text = data / "text" / "wikitext-2" / "wiki.test.tokens.gz"
    code = _mend(["diagnose", str(trained), f"content.data.path={text}",
                  f"output={work / 'diagnose.json'}"]
                 + (["content.windows=4"] if args.tiny else []), env, 120, logs / "eval.log")
    result = {"diagnose": json.loads((work / "diagnose.json").read_text())
              if code == 0 else None, "sets": {}}
    subprocess.run([sys.executable, "-c", "from mend.data.demo import materialize; "
                    f"materialize({str(work / 'demo-tasks')!r})"], env=env, check=True, cwd=ROOT)
    llm = model or "smollm2-135m"
    small = ["data.limit=2", "data.seeds=[100]"] if args.tiny else []
    plan, folders = [], {}
    runs = {**{k: [*v, f"llm={llm}"] for k, v in RUNS.items()},
            "mend": ["method=mend", f"checkpoint={trained}", "llm=null"]}
    for name, where in SETS.items():
        root = work / "demo-tasks" if name.startswith("demo") else data / "metaicl"
        folders[name] = folder = work / "eval" / name
        refs = [f"references.zero_shot={folder / 'zero_shot' / 'results.json'}",
                f"references.icl={folder / 'icl' / 'results.json'}"]
        plan += [[*where, f"data.root={root}", *extra, *small,
                  *(refs if run not in ("zero_shot", "icl") else []),
                  f"output_dir={folder / run}"] for run, extra in runs.items()]
    # One process for every evaluation: the models load in seconds, the interpreter once.
    (work / "eval-plan.json").write_text(json.dumps(plan))
    with open(logs / "eval.log", "a") as f:
        subprocess.run([sys.executable, __file__, str(work / "eval-plan.json")], cwd=ROOT,
                       env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.eval_minutes
                       * 60, check=False)
    for name, folder in folders.items():
        result["sets"][name] = {run: _row(folder / run / "results.json") for run in runs}
    result["ok"] = all(r is not None for s in result["sets"].values() for r in s.values())
    return result


def _row(path: Path) -> dict | None:
    """What a results file says of a run: score, swapped, content gap, recovered share,
    positions held, and the one-off cost of a context."""
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    return {"score": r["results"]["average"]["score"]["mean"],
            "swapped": (r.get("swapped") or {}).get("average", {}).get("score", {}).get("mean"),
            "content_gap": (r.get("content_gap") or {}).get("mean"),
            "share": (r.get("recovered_share") or {}).get("share"),
            "positions": (r.get("memory") or {}).get("prefix_positions"),
            "context_cost": r.get("context_cost")}


def _table(evaluation: dict) -> str:
    def pct(x):
        return "–" if x is None else f"{x * 100:.1f}"
    lines = ["| set | run | score | swapped | gap | share |", "|---|---|---|---|---|---|"]
    for name, runs in evaluation["sets"].items():
        for run, r in runs.items():
            r = r or {}
            lines.append(f"| {name} | {run} | {pct(r.get('score'))} | {pct(r.get('swapped'))} "
                         f"| {pct(r.get('content_gap'))} | {pct(r.get('share'))} |")
    return "\n".join(lines)


def _bundle(work: Path, out: Path, summary: dict) -> None:
    """At most 8 files into ``out``: the checkpoint (bf16), the results, each stage's metrics
    and curves, and the logs."""
    sys.path.insert(0, str(ROOT))
    from mend.provenance import provenance, write_json

    trained = work / "stage2" if (work / "stage2" / "mend_config.json").is_file() else \
        work / "stage1"
    if (trained / "mend_config.json").is_file():
        ckpt = work / "checkpoint"
        subprocess.run([sys.executable, "-c",
                        "import sys, torch; from mend import Distiller; "
                        "Distiller.from_pretrained(sys.argv[1], device='cpu').save_pretrained("
                        "sys.argv[2], dtype=torch.bfloat16)", str(trained), str(ckpt)],
                       check=True, cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
                       capture_output=True)
        with tarfile.open(out / "checkpoint.tgz", "w:gz") as tar:
            tar.add(ckpt, arcname="checkpoint")
    for name in ("stage1", "stage2"):
        for src, dst in ((f"{name}/metrics.jsonl", f"metrics-{name}.jsonl"),
                         (f"{name}/loss.png", f"loss-{name}.png")):
            if (work / src).is_file():
                shutil.copy(work / src, out / dst)
    write_json(out / "results.json", {**summary, "provenance": provenance()})
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        tar.add(work / "logs", arcname="logs")


def evaluate_plan(path: Path) -> None:
    """Every ``mend eval`` argument list in the JSON file ``path``, in this one process; one
    that fails is logged and the rest go on."""
    from mend.errors import MendError
    from mend.recipes.evaluate import cli

    for argv in json.loads(path.read_text()):
        try:
            print(f"$ mend eval {' '.join(argv)}", flush=True)
            cli(argv)
        except (MendError, RuntimeError, OSError) as e:  # one failure costs only itself
            print(f"failed: {type(e).__name__}: {e}", flush=True)


def _device(device: str) -> str:
    import torch
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def _cpu_peak() -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train import peak_flops
    peaks = peak_flops("cpu")
    return max(peaks["float32"], peaks["bfloat16"])


if __name__ == "__main__":
    evaluate_plan(Path(sys.argv[1]))
