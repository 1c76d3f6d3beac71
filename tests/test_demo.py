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

    with pytest.raises(SystemExit, match="--ranks must be >= 1, got 0"):
        main(["demo", "--ranks", "0", "--steps", "1"])
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        main(["demo", "--ranks", "2", "--steps", "0"])
    with pytest.raises(SystemExit, match="--replicas 17 must be >= --experts 16 and divide by the 2 expert-parallel"):
        main(["demo", "--ranks", "2", "--steps", "1", "--replicas", "17"])


def _synthetic_report(steps=120, E=16, seed=0):
    """A report shaped like train()'s: loads with 6x spikes early, balanced later, two rebalances."""
    import numpy as np

    rng = np.random.default_rng(seed)
    load = rng.poisson(100, size=(steps, E)).astype(float)
    load[:10, 0] *= 6  # early spikes
    history = dict(step=list(range(steps)), loss=list(np.linspace(5, 3, steps)), val_step=[59, 119],
                   val_loss=[3.5, 3.0], expert_load=load.tolist(),
                   max_over_mean_expert=list(load.max(1) / load.mean(1)),
                   max_over_mean_rank=[1.1] * steps, rebalance=[dict(step=39), dict(step=79)])
    return dict(history=history, config=dict(num_layers=3, num_experts=E, top_k=2, seed=7), ranks=4,
                num_params=2.1e6, unigram_val_loss=4.1, final_val_loss=3.0, max_over_mean_expert_last=1.2,
                max_over_mean_rank_last=1.1)


def test_plot_colour_scale_ignores_early_spikes_and_title_has_the_flags(tmp_path):
    import numpy as np
    import pytest

    pytest.importorskip("matplotlib")
    from moeflow.commands.demo import add_arguments, flags_text
    from moeflow.demo_plot import colour_range, load_share, plot_training, title_text

    report = _synthetic_report()
    share = load_share(report["history"]["expert_load"])
    vmin, vmax = colour_range(share)
    assert share.max() > 5 and vmax < 1.5  # the 6x spikes do not stretch the scale
    assert vmin < 1 < vmax and vmax == pytest.approx(np.percentile(share, 99))

    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--no-bias", "--rebalance-every", "40", "--quiet", "--out", "x"])
    flags = flags_text(args)
    assert flags == "--no-bias --rebalance-every 40"  # what differs from the defaults; not --out/--quiet
    assert title_text(report, flags).startswith("moeflow demo --no-bias --rebalance-every 40 | 4 ranks, 3 layers, "
                                                "16 experts top-2, 2.1M parameters, seed 7")
    path = plot_training(report, str(tmp_path / "t.png"), flags=flags)
    assert (tmp_path / "t.png").stat().st_size > 20_000 and path.endswith("t.png")
