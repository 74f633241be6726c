"""The benchmarks run end to end on tiny models and write what they promise (nothing here is
timed: speed is judged from the committed results, never in a test)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "metaicl"
needs_data = pytest.mark.skipif(not (DATA / "glue-sst2").exists(),
                                reason=f"the MetaICL tasks are not at {DATA}")


def bench(tmp_path, script: str, *args: str) -> dict:
    subprocess.run([sys.executable, str(ROOT / "bench" / script), "--tiny", "--out",
                    str(tmp_path), "--name", "r", *args], check=True, cwd=ROOT,
                   capture_output=True, text=True)
    result = json.loads((tmp_path / "r.json").read_text())
    assert (tmp_path / "r.md").read_text().startswith("# ")
    assert result["provenance"]["versions"]["torch"] and result["rows"]
    return result


@needs_data
@pytest.mark.slow  # a subprocess per benchmark
def test_inference_bench_reports_every_method_and_the_targets(tmp_path):
    result = bench(tmp_path, "inference.py", "--ks", "1,16", "--queries", "3",
                   "--latency-queries", "1", "--batch-sizes", "2", "--placeholders", "4")
    rows = {(r["k"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(k, m) for k in (1, 16) for m in
                         ("zero_shot", "icl", "icl_kv", "prompt_tuning", "mend")}
    assert rows[16, "icl"]["flops_vs_icl"] == 1.0
    # Reading 16 demonstrations costs the LLM more than reading 4 vectors, per query.
    assert rows[16, "mend"]["llm_flops"] < rows[16, "icl"]["llm_flops"]
    assert rows[16, "mend"]["distiller_flops"] > 0 == rows[16, "icl_kv"]["distiller_flops"]
    assert {t["target"].split(" ")[0] for t in result["targets"]} == {"K=16"}


@needs_data
@pytest.mark.slow  # a subprocess per benchmark
def test_eval_bench_fast_and_naive_paths_agree(tmp_path):
    result = bench(tmp_path, "eval.py", "--limit", "2", "--k", "2", "--placeholders", "4",
                   "--max-tasks", "3")
    assert [r["method"] for r in result["rows"]] == ["icl", "mend"]
    assert all(r["agreement"] == 1.0 and r["rows"] > 0 for r in result["rows"])


@pytest.mark.slow  # a subprocess per benchmark
def test_train_bench_measures_each_lever_beside_the_old_path(tmp_path):
    result = bench(tmp_path, "train.py", "--steps", "1", "--batch", "1", "--demo-tokens", "32",
                   "--input-tokens", "16", "--placeholders", "2", "--recipes", "compacted",
                   "--stages", "pretrain", "--repeats", "1",
                   "--variants", "eager-fp32,old,new,8bit")
    rows = {(r["recipe"], r["stage"], r["variant"]): r for r in result["rows"]}
    fp32 = rows["compacted", "pretrain", "eager-fp32"]
    assert fp32["model_flops"] > 0 and fp32["mfu"] > 0  # counted once
    new, old = rows["compacted", "pretrain", "new"], rows["compacted", "pretrain", "old"]
    emulated = new.get("status", "").startswith("skipped: this CPU multiplies bf16")
    if emulated:
        # A CPU that emulates bf16 runs only the fp32 rows; the bf16 ones say why, with rates.
        assert old["status"] == new["status"] and "GFLOP/s (emulated)" in new["status"]
    else:
        # Each lever's row is measured beside the old path of its recipe and stage (each in
        # a process of its own); the bound is what the step's FLOPs alone would take.
        assert new["mfu"] > 0
        assert new["speedup"] == pytest.approx(new["tokens_per_s"] / old["tokens_per_s"])
        assert new["spread"] >= 1.0 and new["bound_tokens_per_s"] > 0
        assert any(t["target"].startswith("compacted pretrain: new >= 3x")
                   for t in result["targets"])
    # The 8-bit LLM runs wherever bitsandbytes runs it (the CPU too) in bf16, else says why not.
    from mend.core.backbones import bitsandbytes_problem
    status = rows["compacted", "pretrain", "8bit"]["status"]
    runs = bitsandbytes_problem("cpu") is None and not emulated
    assert status == "ok" if runs else status.startswith("skipped: ")


@pytest.mark.slow  # two launches of two processes each
def test_memory_bench_checks_its_estimate_against_measured_runs(tmp_path):
    result = bench(tmp_path, "memory.py")
    checks = {t["target"].split(":")[0]: t for t in result["targets"]}
    assert set(checks) == {f"{e} {p}" for e in ("ddp", "fsdp") for p in
                           ("parameters", "gradients", "optimizer", "activations")}
    assert all(t["met"] for t in checks.values()), checks
    rows = [r for r in result["rows"] if r["config"].startswith("tiny")]
    assert [r["engine"] for r in rows] == ["ddp", "fsdp"]
    assert all(r["measured_total_mib"] > 0 and r["estimated_total_mib"] > 0 for r in rows)


@needs_data
@pytest.mark.slow  # every step of the GPU script, on tiny models: about two minutes
def test_gpu_script_dry_run_runs_every_step_and_bundles_its_results(tmp_path):
    gpu = [sys.executable, str(ROOT / "bench" / "gpu.py")]
    subprocess.run([*gpu, "pack", str(tmp_path / "carry"), "--no-wheels"], check=True, cwd=ROOT,
                   capture_output=True, text=True)
    assert (tmp_path / "carry" / "smollm2-135m" / "tokenizer.json").is_file()
    assert not list((tmp_path / "carry").rglob("*.safetensors"))  # the shape, no weights
    done = subprocess.run([*gpu, "run", "--device", "cpu", "--tiny", "--carried",
                           str(tmp_path / "carry"), "--out", str(tmp_path / "out"), "--work",
                           str(tmp_path / "work"), "--bundle", str(tmp_path / "gpu.tgz")],
                          cwd=ROOT, capture_output=True, text=True)
    summary = json.loads((tmp_path / "out" / "gpu-cpu-tiny.json").read_text())
    steps = {r["step"]: r for r in summary["rows"]}
    assert done.returncode == 0, {k: (r["status"], r.get("tail")) for k, r in steps.items()}
    assert list(steps) == ["shapes", "tests", "train", "train-7b", "eightbit", "inference",
                           "inference-7b", "demo", "resume"]
    assert "passed" in steps["tests"]["summary"]
    assert steps["resume"]["start_steps"][0] == 0 and steps["resume"]["start_steps"][1] > 0
    for name in ("train-cpu-tiny", "train-cpu-7b-tiny", "eightbit-cpu-tiny", "inference-cpu-tiny",
                 "inference-cpu-7b-tiny"):
        assert json.loads((tmp_path / "out" / f"{name}.json").read_text())["rows"]
    import tarfile
    with tarfile.open(tmp_path / "gpu.tgz") as tar:
        assert "results/gpu-cpu-tiny.md" in tar.getnames()


@pytest.mark.slow  # a subprocess
def test_load_bench_samples_memory_over_many_calls(tmp_path):
    result = bench(tmp_path, "load.py", "--queries", "64", "--batch", "8")
    rows = {r["call"]: r for r in result["rows"]}
    assert set(rows) == {"score", "compress_batch"} and rows["score"]["calls"] == 8
    assert all(r["rss_end_mb"] > 0 for r in rows.values()) and len(result["targets"]) == 2


def test_a_cost_that_was_not_counted_reads_na_in_a_bench_table():
    sys.path.insert(0, str(ROOT / "bench"))
    import common
    assert common.table([{"flops": float("nan"), "s": 2.5e9}], ["flops", "s"])[2] == \
        "| n/a | 2.50G |"


@needs_data
@pytest.mark.slow  # the whole GPU training call, on tiny models: about two minutes
def test_the_gpu_training_call_dry_run_trains_evaluates_and_bundles(tmp_path):
    """The chunked carry (a tiny model's weights split into chunk folders, all but the last
    staged by earlier commands), both stages stopped by their budgets, the evaluation beside
    its controls, the bundle, and the bundled checkpoint scoring on the CPU."""
    import tarfile

    from mend import Distiller

    gpu = [sys.executable, str(ROOT / "bench" / "gpu.py")]
    carry = tmp_path / ".gpu"
    subprocess.run([*gpu, "pack", str(carry), "--no-wheels", "--weights", "--tiny",
                    "--chunk-mib", "0.05"], check=True, cwd=ROOT, capture_output=True, text=True)
    chunks = sorted(tmp_path.glob(".gpu-w*"))
    assert len(chunks) >= 2 and not list((carry / "tiny-model").glob("*.safetensors"))
    staged = ["--staged", str(tmp_path / "staged")]
    for chunk in chunks[:-1]:
        subprocess.run([*gpu, "stage", str(chunk), *staged], check=True, cwd=ROOT)
    out = tmp_path / "out"
    done = subprocess.run([*gpu, "train", "--device", "cpu", "--tiny", "--carried", str(carry),
                           *staged, "--chunks", str(chunks[-1]), "--minutes", "0.2,0.2", "--out",
                           str(out), "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("tokens/s: stage 1 ")
    assert len(list(out.iterdir())) <= 8
    summary = json.loads((out / "results.json").read_text())
    for stage in ("stage1", "stage2"):
        assert summary["stages"][stage]["exit"] == 0 and summary["stages"][stage]["minutes"]
        assert (out / f"metrics-{stage}.jsonl").is_file()
    assert summary["stages"]["stage1"]["tokens"] > 0 and summary["stages"]["stage1"]["mfu"] > 0
    sets = summary["evaluation"]["sets"]
    assert set(sets) == {"demo", "demo-long", "class_to_class"}
    for runs in sets.values():
        assert set(runs) >= {"zero_shot", "icl", "icl-equal-memory", "kv_compress",
                             "attention_matching", "mend"}
        assert runs["mend"]["swapped"] is not None  # its swap control beside it
    logs = tmp_path / "work" / "logs"
    assert "max_minutes=0.2 spent" in (logs / "stage1.log").read_text()
    with tarfile.open(out / "checkpoint.tgz") as tar:
        tar.extractall(tmp_path / "unpacked")
    d = Distiller.from_pretrained(tmp_path / "unpacked" / "checkpoint", device="cpu")
    assert len(d.score(d.compress([("a", "b"), ("c", "d")]), ["e"], ["b", "d"])[0]) == 2
