"""The pipeline step model: torch's action lists played on one layer cost model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moeflow import simulate as sim
from moeflow import simulate_pipeline as sp


@pytest.fixture(scope="module")
def costs():
    return sp.layer_costs(sp.DEEPSEEK_V3, sim.ClusterSpec(nodes=8, gpus_per_node=8), tokens=4096)


def test_deepseek_v3_flops_match_its_published_activated_parameters():
    m = sp.DEEPSEEK_V3
    scores = 2 * m.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * (m.seq_len / 2)
    gemm_flops = (m.flops_per_token() - scores) * m.num_layers
    # 37B activated parameters, of which the embedding and the head are 2 x 7168 x 129280
    assert gemm_flops == pytest.approx(2 * (37e9 - 2 * 7168 * 129280), rel=0.03)


def test_without_stage_transfers_the_1f1b_bubble_is_the_readme_formula(costs):
    free = replace(costs, pp_transfer=0.0)
    for ranks, micro in ((4, 8), (16, 64)):
        r = sp.simulate_schedule("1f1b", free, num_ranks=ranks, num_layers=61, num_microbatches=micro)
        assert r.bubble_us == pytest.approx(sp.readme_bubble("1f1b", r.chunk, ranks), rel=1e-9)
        # every rank does the same work: (micro-batches) x (F + B)
        assert min(r.work_per_rank_us) == pytest.approx(micro * (r.chunk.F + r.chunk.B), rel=1e-9)
        gpipe = sp.simulate_schedule("gpipe", free, num_ranks=ranks, num_layers=61, num_microbatches=micro)
        assert gpipe.step_us == pytest.approx(r.step_us, rel=1e-9)


def test_dualpipev_bubble_is_near_the_readme_formula_and_overlap_shortens_the_step(costs):
    free = replace(costs, pp_transfer=0.0)
    plain = sp.simulate_schedule("dualpipev", free, num_ranks=16, num_layers=61, num_microbatches=64)
    over = sp.simulate_schedule("dualpipev", free, num_ranks=16, num_layers=61, num_microbatches=64, overlap=True)
    for r in (plain, over):  # torch's DualPipeV: within 5% of DeepSeek's formula for its own
        assert r.bubble_us == pytest.approx(sp.readme_bubble("dualpipev", r.chunk, r.num_stages), rel=0.05)
    one = sp.simulate_schedule("1f1b", free, num_ranks=16, num_layers=61, num_microbatches=64)
    assert plain.bubble_us < one.bubble_us and over.step_us < plain.step_us
    # overlapped pairs hide their communication (compute covers it at this shape); what stays
    # exposed is the warm-up and cool-down actions', which run alone
    assert over.exposed_comm_us < 0.4 * plain.exposed_comm_us
    for name in ("zbv", "interleaved1f1b"):  # the other schedules play to the end too
        assert sp.simulate_schedule(name, free, num_ranks=4, num_layers=61, num_microbatches=8).step_us > 0


def test_simulate_pipeline_cli(capsys):
    from moeflow.cli import main

    assert main(["simulate", "--pipeline", "--pp", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert "pipeline of 4 ranks, each stage an EP64 group on 8 nodes x 8 GPUs" in out
    assert "DualPipeV, overlap" in out and "expected DualPipeV (overlap) gain over 1F1B" in out
    assert main(["simulate", "--pipeline", "--pp", "4", "--microbatches", "6"]) == 2
    assert "DualPipeV needs --microbatches >= 2 x --pp = 8, got 6" in capsys.readouterr().err
