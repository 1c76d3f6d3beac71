"""`moeflow demo`, shortened: it trains, learns, and writes what it promises."""

import json


def test_demo_short_run_learns_and_reports(tmp_path):
    from moeflow.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--ranks", "2", "--steps", "100", "--batch-size", "4", "--quiet", "--out", str(out),
                 "--rebalance-every", "50"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "training.png").stat().st_size > 10_000
    # learning: well below the unigram baseline after 100 steps (a full nat below it by then)
    assert report["final_val_loss"] < report["unigram_val_loss"] - 0.7, report["final_val_loss"]
    h = report["history"]
    assert len(h["loss"]) == 100 and h["loss"][-1] < h["loss"][0]
    # load statistics are counts of real routing: K pairs per token, per MoE layer
    cfg = report["config"]
    tokens_per_step = 2 * cfg["batch_size"] * cfg["seq_len"]
    for step_loads in h["expert_load_per_layer"]:
        assert [sum(layer) for layer in step_loads] == [tokens_per_step * cfg["num_topk"]] * len(step_loads)
    assert report["max_over_mean_expert_last"] >= 1.0 and report["max_over_mean_rank_last"] >= 1.0
    assert report["bytes_per_step"] > 0
    # one rebalance at step 50 into 16 + 2 slots; its plan beats what the 50 steps before saw
    assert cfg["num_slots"] == 18 and [r["step"] for r in report["rebalance"]] == [49]
    r = report["rebalance"][0]
    assert r["moves"] > 0 and 1.0 <= r["predicted_max_over_mean_rank"] < r["max_over_mean_rank_before"]


def test_demo_rejects_bad_flags(capsys):
    import pytest

    from moeflow.cli import main

    with pytest.raises(SystemExit, match="--experts 16 must divide by the 3 expert-parallel ranks"):
        main(["demo", "--ranks", "3", "--steps", "1"])
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        main(["demo", "--ranks", "2", "--steps", "0"])
    with pytest.raises(SystemExit, match="--replicas 17 must be >= --experts 16 and divide by the 2 expert-parallel"):
        main(["demo", "--ranks", "2", "--steps", "1", "--replicas", "17"])
