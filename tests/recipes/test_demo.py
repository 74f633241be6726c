"""``mend demo --tiny``: the main job end to end on random tiny models, through the CLI."""

import json

import pytest

from mend.cli import main
from mend.data.demo import LONG_TASKS, materialize
from mend.data.metaicl import load_partition


def test_builtin_tasks_materialize_as_a_metaicl_partition(tmp_path):
    root = materialize(tmp_path)
    train, test = load_partition(root, "demo")
    assert {t.name for t in test} == {"country_capital", "country_language", "animal_fruit",
                                      "sentence_agent", *LONG_TASKS}
    assert len(train) == 5 and not {t.name for t in train} & {t.name for t in test}
    # The long tasks: even one demonstration is longer than a 16-position prefix.
    for task in (t for t in test if t.name in LONG_TASKS):
        rows = task.rows("train", 100) + task.rows("test")
        assert len(rows) == 48 and len({r["input"] for r in rows}) == 48
        assert min(len(r["input"].split()) for r in rows) > 16
    capital = next(t for t in test if t.name == "country_capital")
    demos, queries = capital.rows("train", 100), capital.rows("test")
    assert len(demos) == 16 and len(queries) == 32
    assert not {r["input"] for r in demos} & {r["input"] for r in queries}
    # The same inputs and options in two tasks: only the demonstrations tell them apart.
    language = next(t for t in test if t.name == "country_language")
    assert {r["input"] for r in language.rows("test")} | {r["input"] for r in language.rows(
        "train", 100)} == {r["input"] for r in queries + demos}
    # The long tasks ask what short ones ask, of the same inputs inside long sentences.
    trip = next(t for t in test if t.name == "trip_capital")
    long_rows = trip.rows("test") + trip.rows("train", 100)
    assert sorted(r["output"] for r in long_rows) == sorted(r["output"] for r in queries + demos)
    assert all(any(r["input"] in x["input"] for x in long_rows) for r in queries + demos)


@pytest.mark.slow  # trains a tiny distiller end to end
def test_mend_demo_tiny_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEND_CACHE", str(tmp_path / "cache"))
    # Fewer queries, steps and rounds than a user's run: the same rows and code paths.
    assert main(["demo", "--tiny", "--output-dir", str(tmp_path / "demo"), "queries=12",
                 "train_steps=10", "cost_rounds=2"]) == 0
    printed = capsys.readouterr().out
    assert "training one briefly first" in printed and "| MEND (compress once) |" in printed
    assert "cheaper than ICL + KV cache from query" in printed
    result = json.loads((tmp_path / "demo" / "results.json").read_text())
    rows = {r["method"]: r for r in result["methods"]}
    assert list(rows) == ["zero-shot", "ICL (re-read per query)", "ICL + KV cache",
                          "ICL at equal memory + KV cache", "KV cache cut to equal memory",
                          "KVzip cut to equal memory", "Attention Matching at equal memory",
                          "MEND (compress once)"]
    icl, kv, mend = (rows[k] for k in ("ICL (re-read per query)", "ICL + KV cache",
                                       "MEND (compress once)"))
    # The equal-memory rows hold what MEND's prefix holds: bos + l positions (l = 16).
    cuts = ("KV cache cut to equal memory", "KVzip cut to equal memory",
            "Attention Matching at equal memory")
    for label in ("ICL at equal memory + KV cache", *cuts, "MEND (compress once)"):
        assert rows[label]["memory"]["prefix_positions"] <= 17
    assert all(rows[label]["memory"]["prefix_positions"] == 17 for label in cuts)
    assert kv["memory"]["prefix_positions"] > 17
    # Short and long demonstrations apart: the share within each group is the share of the
    # group's own scores.
    for row in rows.values():
        assert set(row["groups"]) == {"short", "long"}
    long = [t for t in mend["tasks"] if t in LONG_TASKS]
    assert mend["groups"]["long"]["accuracy"] == pytest.approx(
        sum(mend["tasks"][t] for t in long) / len(long))
    share = mend["recovered_share"]
    assert rows["ICL + KV cache"]["recovered_share"]["share"] in (None, pytest.approx(1.0))
    if share["share"] is not None:
        z, i = (sum(rows[k]["tasks"][t] for t in share["counted"]) for k in
                ("zero-shot", "ICL + KV cache"))
        m = sum(mend["tasks"][t] for t in share["counted"])
        assert share["share"] == pytest.approx((m - z) / (i - z))
    # ICL re-reads its demonstrations per query; with the KV cache, and for MEND, the context
    # is read once and shown apart from the queries.
    assert icl["once"]["flops"] == 0 and kv["once"]["llm_flops"] > 0 == kv["once"]["context_flops"]
    assert mend["once"]["context_flops"] > 0  # the distiller pass, paid once per task
    assert mend["per_query"]["flops"] < kv["per_query"]["flops"] < icl["per_query"]["flops"]
    assert mend["per_query"]["cache_bytes"] < kv["per_query"]["cache_bytes"]
    assert kv["accuracy"] == icl["accuracy"]  # the same scores, computed once
    assert rows["zero-shot"]["swapped_accuracy"] is None
    assert mend["content_gap"] == pytest.approx(mend["accuracy"] - mend["swapped_accuracy"])
    # Break-even in FLOPs, by hand: the fewest n with once_mend + n q_mend < once_b + n q_b.
    for label, even in result["break_even"]["MEND (compress once)"].items():
        b = rows[label]
        n = even["flops"]
        if n is None:  # never: MEND costs at least as much per query (equal memory)
            assert mend["per_query"]["flops"] >= b["per_query"]["flops"]
            continue
        total = lambda r, n: r["once"]["flops"] + n * r["per_query"]["flops"]  # noqa: E731
        assert total(mend, n) < total(b, n) and (n == 1 or total(mend, n - 1) >= total(b, n - 1))
    assert all(0 <= r["accuracy"] <= 1 and r["per_query"]["seconds"] > 0 for r in rows.values())
    # Where the time went: setup, each method's accuracy, the costs; together within the whole.
    split = result["wall_split_s"]
    assert {"setup", "costs", "accuracy: MEND (compress once)"} <= set(split)
    assert 0 < sum(split.values()) <= result["wall_time_s"]
    # Costs measured on one task per length group, each weighted by its group's share.
    assert result["cost_tasks"] == {"country_capital": pytest.approx(4 / 6),
                                    "trip_capital": pytest.approx(2 / 6)}
    assert (tmp_path / "demo" / "demo.png").is_file()
    assert "versions" in result["provenance"]
    # A second run finds the checkpoint the first one trained.
    assert main(["demo", "--tiny", "queries=4", "refine_steps=2", "--output-dir",
                 str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert "earlier `mend demo` run" in again["models"]["checkpoint_origin"]
    # Refinement is paid once per task, beside MEND's compression, and never per query.
    rows = {r["method"]: r for r in again["methods"]}
    refined, plain = rows["MEND + 2 refine steps"], rows["MEND (compress once)"]
    assert refined["once"]["flops"] > plain["once"]["flops"]
    assert refined["per_query"]["flops"] == pytest.approx(plain["per_query"]["flops"], rel=0.05)
    assert set(again["break_even"]) == {"MEND (compress once)", "MEND + 2 refine steps"}


def test_the_shipped_demo_distiller_fits_the_zoo_pair():
    """mend/assets/demo-distiller is what `mend demo` uses by default: LoRA adapters and
    placeholders for SmolLM2-135M -> SmolLM2-135M with a key/value output, a few MB."""
    from mend.core.checkpoint import load_weights
    from mend.core.distiller import read_config
    from mend.recipes.demo import ASSET, ZOO_PAIR

    config = read_config(ASSET)
    assert (config.distiller, config.llm) == ZOO_PAIR and config.train_mode == "lora"
    assert config.output == "kv" and (config.io_sep, config.demo_sep) == ("\n", "\n\n")
    weights = load_weights(ASSET, "mend")
    assert weights["placeholders"].shape == (config.num_placeholders, 576)  # SmolLM2's width
    assert not any(k.startswith("projection.") for k in weights)  # kv: no projection
    assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
    assert sum(t.numel() * t.element_size() for t in weights.values()) < 8 * 2**20
