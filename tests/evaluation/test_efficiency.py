"""Efficiency measurements: FLOPs that follow the context, and the side-by-side job."""

import json

import pytest

from mend.config import load_config
from mend.data.metaicl import ContextBuilder, ContextConfig, load_task
from mend.evaluation.efficiency import PeakMemory, count_flops, query_costs
from mend.methods import MethodConfig, build_method
from mend.recipes.efficiency import EfficiencyConfig
from mend.recipes.efficiency import main as efficiency
from tests.support import write_metaicl


@pytest.fixture
def setup(tmp_path, tiny_model):
    from mend import Distiller, MendConfig
    root = write_metaicl(tmp_path / "data", ["t1"], ["t1"], seeds=(100, 13))
    llm = tiny_model("gpt2", 48)
    Distiller.from_config(MendConfig(distiller=tiny_model("llama"), llm=llm, num_placeholders=4,
                                     max_distiller_length=512)).save_pretrained(tmp_path / "m")
    return tmp_path, root, llm


def test_icl_flops_grow_with_k_while_mends_llm_flops_do_not(setup):
    tmp_path, root, llm = setup
    task = load_task(root, "t1")
    rows = task.rows("dev", 100)[:3]
    pool = task.rows("train", 100) + task.rows("train", 13)
    costs = {}
    for name, cfg in [("icl", MethodConfig("icl", llm=llm)),
                      ("mend", MethodConfig("mend", checkpoint=str(tmp_path / "m")))]:
        method = build_method(cfg)
        builder = ContextBuilder.for_method(method, ContextConfig(max_input_tokens=64))
        for k in (1, 4, 16):
            demos = [[(r["input"], r["output"]) for r in pool[:k]]] * len(rows)
            costs[name, k] = query_costs(method, builder, demos, rows, "cpu")
    icl = [costs["icl", k]["llm_flops"] for k in (1, 4, 16)]
    assert icl[0] < icl[1] < icl[2]
    assert all(costs["icl", k]["context_flops"] == 0 for k in (1, 4, 16))
    mend_llm = {costs["mend", k]["llm_flops"] for k in (1, 4, 16)}
    assert len(mend_llm) == 1  # the LLM reads 4 vectors whatever k is
    distiller = [costs["mend", k]["context_flops"] for k in (1, 4, 16)]
    assert 0 < distiller[0] < distiller[1] < distiller[2]  # the distiller reads the demos
    assert all(c["seconds"] > 0 for c in costs.values())


def test_peak_memory_of_a_query_is_measured_around_its_scoring(setup, monkeypatch):
    """A query whose scoring allocates 64 MiB reports at least that much, in both the
    per-query and the compress-once measurement (so the numbers measure the query)."""
    import torch

    from mend.evaluation.efficiency import Serving, serving_costs
    tmp_path, root, llm = setup
    task = load_task(root, "t1")
    rows = task.rows("dev", 100)[:3]
    demos = [(r["input"], r["output"]) for r in task.rows("train", 100)[:4]]
    method = build_method(MethodConfig("mend", checkpoint=str(tmp_path / "m")))
    builder = ContextBuilder.for_method(method, ContextConfig(max_input_tokens=64))
    score = method.llm.score_pairs

    def hungry(*args, **kwargs):
        held = torch.ones(64, 2**20 // 4)  # 64 MiB while the query is scored
        held.add_(1)
        return score(*args, **kwargs)
    monkeypatch.setattr(method.llm, "score_pairs", hungry)
    per_query = query_costs(method, builder, [demos] * len(rows), rows, "cpu")
    served = serving_costs({"mend": Serving(method, builder)}, demos, rows, "cpu",
                           rounds=1)["mend"]["per_query"]
    assert per_query["peak_bytes"] >= 32 * 2**20 and served["peak_bytes"] >= 32 * 2**20


def test_break_even_and_cache_bytes_by_hand():
    import torch

    from mend.evaluation.efficiency import break_even, tensor_bytes

    def costs(once, per_query):
        return {"once": {"flops": once}, "per_query": {"flops": per_query}}
    # a pays 100 up front and saves 30 a query: 100 < 30 n first at n = 4.
    assert break_even(costs(100, 10), costs(0, 40)) == 4
    assert break_even(costs(90, 10), costs(0, 40)) == 4  # 90 < 90 is false at n = 3
    assert break_even(costs(0, 10), costs(5, 10)) == 1  # cheaper up front, the same after
    assert break_even(costs(10, 50), costs(0, 40)) is None  # dearer per query: never
    cache = {"layers": [(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bfloat16))] * 2}
    assert tensor_bytes(cache) == 2 * 3 * 4 + 2 * 3 * 2  # the same layer object counted once


def test_flop_counter_and_peak_memory_on_known_work():
    import torch
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    _, flops = count_flops(lambda: a @ b)
    assert flops == 2 * 64 * 32 * 16
    # Attention is counted on the CPU too: QK^T and AV, 2 * 2 * B * H * Sq * Sk * D.
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    _, flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k))
    assert flops == 4 * 2 * 5 * 7 * 8
    with PeakMemory("cpu") as mem:
        big = torch.ones(64, 2**20 // 4)  # 64 MiB, held until the block ends
        big.add_(1)
    assert mem.peak >= 32 * 2**20
    del big


def test_efficiency_job_writes_the_side_by_side_table(setup):
    tmp_path, root, llm = setup
    cfg = load_config(EfficiencyConfig, None, [
        f"root={root}", "task=t1", "context.k=4", "queries=3", f"output_dir={tmp_path / 'eff'}",
        f"methods=[{{method: icl, llm: {llm}}}, {{method: mend, checkpoint: {tmp_path / 'm'}}}]"])
    result = efficiency(cfg)
    assert [r["method"] for r in result["methods"]] == ["icl", "mend"]
    saved = json.loads((tmp_path / "eff" / "efficiency.json").read_text())
    assert saved["queries"] == 2 and "versions" in saved["provenance"]
    assert (tmp_path / "eff" / "efficiency.png").is_file()
    assert "FLOPs vs ICL" in (tmp_path / "eff" / "efficiency.md").read_text()


def test_a_count_that_fails_says_na_with_its_reason_and_costs_nothing_else(setup, monkeypatch):
    import math

    import torch

    from mend.evaluation import efficiency as eff

    def broken(*args, **kwargs):
        raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
    # The failure a new kernel or shape gave on CUDA, made here on the CPU's attention.
    formulas = {**eff.FORMULAS, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                broken, torch.ops.aten._scaled_dot_product_efficient_attention: broken,
                torch.ops.aten._scaled_dot_product_attention_math: broken}
    monkeypatch.setattr(eff, "FORMULAS", formulas)
    monkeypatch.setattr(eff, "_UNCOUNTED", {})
    q = torch.randn(1, 2, 5, 8)
    with pytest.warns(UserWarning, match="FLOPs not counted"):
        out, flops = eff.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, q, q))
    assert out.shape == (1, 2, 5, 8) and math.isnan(flops)  # the work was still done
    assert eff.uncounted() == ["AssertionError: sdpa_flop_count: query/key/value shapes are "
                               "incompatible"]
    assert eff.gflops(flops) == "n/a" and eff.gflops(2.5e9) == "2.50"
    costs = {"once": {"flops": 0}, "per_query": {"flops": flops}}
    assert math.isnan(eff.break_even(costs, {"once": {"flops": 0}, "per_query": {"flops": 9}}))
    # A failure of the work itself is not hidden, nor taken for the counter's.
    with pytest.raises(ZeroDivisionError):
        eff.count_flops(lambda: 1 / 0)
    assert len(eff.uncounted()) == 1

    # The whole efficiency job finishes, and its table says n/a and why.
    tmp_path, root, llm = setup
    cfg = load_config(EfficiencyConfig, None, [
        f"root={root}", "task=t1", "context.k=4", "queries=3", f"output_dir={tmp_path / 'na'}",
        f"methods=[{{method: icl, llm: {llm}}}]"])
    efficiency(cfg)
    table = (tmp_path / "na" / "efficiency.md").read_text()
    assert "| icl | n/a | 0.00 | n/a |" in table and "FLOPs n/a: AssertionError" in table
