"""The transfer report: each run's score beside its swap control, recovered share and memory."""

import json

import yaml

from mend.reporting.report import build


def agg(values):
    mean = sum(values.values()) / len(values)
    return {"average": {"score": {"mean": mean, "std": 0.0}},
            "tasks": {t: {"score": {"mean": v, "std": 0.0}} for t, v in values.items()}}


def write_run(root, name, method, scores, swapped=None, memory=None, budget=900, where="demo",
              cost=None):
    """One evaluation's results.json, as the harness writes it, under ``root/where/eval``."""
    result = {"label": name, "method": method, "results": agg(scores), "memory": memory,
              "context": {"max_context_tokens": budget}, "context_cost": cost}
    if swapped:
        result |= {"swapped": agg(swapped), "content_gap": {
            "mean": agg(scores)["average"]["score"]["mean"]
            - agg(swapped)["average"]["score"]["mean"], "std": 0.0}}
    d = root / where / "eval" / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(result))


def test_transfer_setting_reports_share_gap_and_compression(tmp_path):
    root = tmp_path / "results" / "generalise"

    def run(*args, **kwargs):
        write_run(root, *args, **kwargs)

    run("zero_shot", "zero_shot", {"a": 0.3, "b": 0.5})
    run("icl", "icl", {"a": 0.9, "b": 0.51}, {"a": 0.2, "b": 0.5},
        {"context_tokens": 120, "prefix_positions": 121, "compression": 120 / 121})
    run("kv_compress", "kv_compress", {"a": 0.6, "b": 0.4}, {"a": 0.5, "b": 0.4},
        {"context_tokens": 120, "prefix_positions": 17, "compression": 120 / 17},
        cost={"flops": 2.5e9, "seconds": 0.125})
    # ICL cut to 16 tokens is not the reference, even where full ICL recorded no memory.
    run("icl-equal-memory", "icl", {"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5},
        {"context_tokens": 120, "prefix_positions": 16, "compression": 120 / 16}, budget=16)
    (root / "report.yaml").write_text(yaml.safe_dump({"kind": "transfer", "title": "T"}))
    text = build(tmp_path / "results")
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines()
            if line.startswith("| ")}
    assert list(rows)[1:] == ["zero_shot", "icl", "icl-equal-memory", "kv_compress"]
    # Only task a counts (ICL gains 1 point on b): (0.6 - 0.3) / (0.9 - 0.3) = 50%.
    assert rows["kv_compress"] == ("| kv_compress | 50.0 ± 0.0 | 45.0 ± 0.0 | 5.0 ± 0.0 | 50% "
                                   "| 120 → 17 | 7.1x | 2.50 GFLOPs, 0.12 s |")
    assert "| 100% | 120 → 121 | 1.0x | – |" in rows["icl"]
    assert "| 33% | 120 → 16 | 7.5x |" in rows["icl-equal-memory"]  # (0.5 - 0.3) / 0.6


def test_ablation_table_gathers_each_lever_across_sets(tmp_path):
    root = tmp_path / "results" / "generalise"
    mem = {"context_tokens": 120, "prefix_positions": 17, "compression": 120 / 17}
    for where in ("demo", "c2c"):
        write_run(root, "zero_shot", "zero_shot", {"a": 0.2}, where=where)
        write_run(root, "icl", "icl", {"a": 0.6}, {"a": 0.3}, where=where)
    write_run(root, "mend", "mend", {"a": 0.5}, {"a": 0.4}, mem, where="demo")
    write_run(root, "mend", "mend", {"a": 0.1}, {"a": 0.2}, mem, where="c2c")
    # ICL cut to a token budget holds what fits on each set.
    for where, held in (("demo", 12), ("c2c", 16)):
        write_run(root, "cut", "icl", {"a": 0.4}, {"a": 0.4}, {
            "context_tokens": 120, "prefix_positions": held, "compression": 120 / held},
            where=where)
    # mixture was scored on the demo only.
    write_run(root, "mixture", "mend", {"a": 0.6}, {"a": 0.3}, mem, where="demo")
    (root / "mixture").mkdir()
    (root / "mixture" / "metrics.jsonl").write_text(
        '{"step": 50, "monitor_content_share": 0.5}\n{"step": 50, "loss": 1.0}\n'
        '{"step": 100, "monitor_content_share": 0.25}\n')
    # selected kept step 100's weights (its first best dev score), not step 150's.
    (root / "selected").mkdir()
    (root / "selected" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"step": 50, "monitor_content_share": 0.5}, {"step": 50, "eval_score": 0.3},
        {"step": 100, "monitor_content_share": 0.6}, {"step": 100, "eval_score": 0.4},
        {"step": 150, "monitor_content_share": 0.7}, {"step": 150, "eval_score": 0.4}]))
    (root / "diagnose.json").write_text(json.dumps({"content_share": 0.4}))
    (root / "report.yaml").write_text(yaml.safe_dump({"kind": "transfer", "title": "T",
        "ablation": {"sets": ["c2c", "demo"], "rows": [
            {"run": "mend", "lever": "shipped", "held_out": "diagnose.json"},
            {"run": "mixture", "held_out": "mixture/metrics.jsonl"},
            {"run": "selected", "held_out": "selected/metrics.jsonl"},
            {"run": "cut"}]}}))
    text = build(tmp_path / "results")
    table = text[text.index("### The levers"):].splitlines()
    assert table[2] == ("| lever | c2c: share / gap | demo: share / gap | held-out text share "
                        "| positions per query |")
    # demo: (0.5 - 0.2) / (0.6 - 0.2) = 75%, gap +10.0; c2c: (0.1 - 0.2) / 0.4 = -25%, gap -10.0.
    assert table[4] == "| shipped | -25% / -10.0 | 75% / +10.0 | 40.0% | 17 |"
    # The last share logged in training; "–" for the set it was not scored on.
    assert table[5] == "| mixture | – | 100% / +30.0 | 25.0% | 17 |"
    assert table[6] == "| selected | – | – | 60.0% | – |"
    assert table[7] == "| cut | 50% / +0.0 | 50% / +0.0 | – | 12–16 |"
