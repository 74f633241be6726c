"""Efficiency measurements: FLOPs that follow the context, and the side-by-side job."""

import json

import pytest

from conftest import write_metaicl
from mend.config import load_config
from mend.data import Counters
from mend.data.metaicl import ContextBuilder, load_task
from mend.efficiency import PeakMemory, count_flops, query_costs
from mend.methods import MethodConfig, build_method
from mend.recipes.efficiency import EfficiencyConfig
from mend.recipes.efficiency import main as efficiency


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
        builder = ContextBuilder(method.llm.tokenizer, method.format, method.llm.bos, 64, 900,
                                 method.llm.max_length, Counters())
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
    assert all(c["seconds"] > 0 and c["peak_bytes"] >= 0 for c in costs.values())


def test_flop_counter_and_peak_memory_on_known_work():
    import torch
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    _, flops = count_flops(lambda: a @ b)
    assert flops == 2 * 64 * 32 * 16
    with PeakMemory("cpu") as mem:
        big = torch.ones(64, 2**20 // 4)  # 64 MiB, held until the block ends
        big.add_(1)
    assert mem.peak >= 32 * 2**20
    del big


def test_efficiency_job_writes_the_side_by_side_table(setup):
    tmp_path, root, llm = setup
    cfg = load_config(EfficiencyConfig, None, [
        f"root={root}", "task=t1", "k=4", "queries=3", f"output_dir={tmp_path / 'eff'}",
        f"methods=[{{method: icl, llm: {llm}}}, {{method: mend, checkpoint: {tmp_path / 'm'}}}]"])
    result = efficiency(cfg)
    assert [r["method"] for r in result["methods"]] == ["icl", "mend"]
    saved = json.loads((tmp_path / "eff" / "efficiency.json").read_text())
    assert saved["queries"] == 2 and "versions" in saved["provenance"]
    assert (tmp_path / "eff" / "efficiency.png").is_file()
    assert "FLOPs vs ICL" in (tmp_path / "eff" / "efficiency.md").read_text()
