"""`moeflow demo --pp 2`, shortened: it trains pipelined on 4 ranks and reports its timeline."""

import json

import pytest


def test_pipelined_demo_trains_and_reports_its_timeline(tmp_path):
    from moeflow.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--ranks", "4", "--pp", "2", "--schedule", "dualpipev", "--steps", "6", "--quiet",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "training.png").stat().st_size > 10_000
    assert (report["pp"], report["ep"], report["pipeline"]["overlap"]) == (2, 2, True)
    h = report["history"]
    assert len(h["loss"]) == 6 and h["loss"][-1] < h["loss"][0]  # it learns (6 steps of warm-up)
    assert report["final_val_loss"] < 6.0
    for k in ("wall", "compute", "exposed_comm", "bubble", "switching"):
        assert len(h[k]) == 6 and all(len(per_rank) == 4 for per_rank in h[k])
    for per_rank in zip(h["wall"], h["compute"], h["exposed_comm"], h["bubble"], h["switching"]):
        for wall, compute, comm, bubble, switching in zip(*per_rank):
            assert compute > 0 and comm > 0 and bubble >= 0 and switching > 0  # overlap: lanes hand over
            assert compute + comm + bubble + switching == pytest.approx(wall, rel=1e-6)
    # the last step's timeline, every rank: forwards, backwards, overlapped pairs' communication
    for spans in report["last_step_spans"]:
        kinds = {kind for _, kind, _, _ in spans}
        assert {"F", "B", "issue", "wait"} <= kinds
        assert len({lane for lane, kind, _, _ in spans if kind == "F"}) == 2 * 8  # 2 stages x 8 micro-batches


def test_pipelined_demo_rejects_what_cannot_run(capsys):
    from moeflow.cli import main
    from moeflow.demo import DemoConfig
    from moeflow.demo_pipeline import PipelineConfig, check_config

    # one line on stderr and exit status 2, before any rank starts
    assert main(["demo", "--ranks", "4", "--pp", "3", "--steps", "1"]) == 2
    assert "pp must be >= 2 and divide the 4 ranks, got pp=3" in capsys.readouterr().err
    assert main(["demo", "--ranks", "4", "--pp", "2", "--steps", "1", "--rebalance-every", "5"]) == 2
    assert "not part of the pipelined demo" in capsys.readouterr().err
    cfg = DemoConfig(num_layers=4, batch_size=8)
    for pcfg, message in ((PipelineConfig(schedule="1f1b", num_microbatches=4), "overlap needs the DualPipeV schedule"),
                          (PipelineConfig(num_microbatches=3), "batch size \\(8\\) must divide into 3 micro-batches"),
                          (PipelineConfig(num_microbatches=2), "DualPipeV needs micro-batches >= 4"),
                          (PipelineConfig(schedule="zb", num_microbatches=4), "schedule must be one of")):
        with pytest.raises(ValueError, match=message):
            check_config(cfg, pcfg, 4)
    with pytest.raises(ValueError, match="layers \\(3\\) must be >= the 4 stages of dualpipev"):
        check_config(DemoConfig(num_layers=3), PipelineConfig(), 4)
