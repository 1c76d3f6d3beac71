"""Cluster cost simulator: reach formulas against sampling, the bytes model against counts on a
concrete routing, every DeepEP H800 figure within 15%, the CLI, and named errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moeflow.cli import main
from moeflow.simulate import (DEEPEP_H800, ClusterSpec, Reach, bytes_per_token, compare_deepep, expected_reach,
                              link_bytes, simulate_dispatch_combine)

from _files import write_loads


def _miss(E, K, u):
    return math.comb(E - u, K) / math.comb(E, K)


def _reference_topk(E, K, num_groups, num_topk_groups, T, seed):
    """Group-limited routing the slow way, per token: walk the experts from best iid score down;
    the groups met first are the chosen ones (a group's score is its best expert's), and the
    first K experts met inside chosen groups are the picks. [T, K] int64."""
    g = torch.Generator().manual_seed(seed)
    Eg = E // num_groups
    rows = []
    for _ in range(T):
        order = torch.rand(E, generator=g).argsort(descending=True).tolist()
        groups = []
        for e in order:
            if e // Eg not in groups and len(groups) < num_topk_groups:
                groups.append(e // Eg)
        rows.append([e for e in order if e // Eg in groups][:K])
    return torch.tensor(rows)


# ------------------------------------------------------------------------------------------ reach


@pytest.mark.parametrize("E,K,R,G", [(256, 8, 16, 8), (64, 6, 8, 4), (32, 4, 4, 1)])
def test_uniform_reach_is_the_closed_form_and_matches_sampling(E, K, R, G):
    exact = expected_reach(E, K, R, G)
    assert exact.method == "exact"
    np.testing.assert_allclose(exact.prob_token_in_rank, 1 - _miss(E, K, E // R))
    np.testing.assert_allclose(exact.prob_token_in_node, 1 - _miss(E, K, E // (R // G)))
    # Uniform loads force the sampler: same numbers within Monte Carlo error (20000 tokens).
    mc = expected_reach(E, K, R, G, expert_loads=np.ones(E), num_samples=20000, seed=1)
    assert mc.method.startswith("Monte Carlo")
    np.testing.assert_allclose(mc.prob_token_in_rank, exact.prob_token_in_rank, atol=0.02)
    assert mc.num_ranks_per_token == pytest.approx(exact.num_ranks_per_token, rel=0.01)
    assert mc.num_nodes_per_token == pytest.approx(exact.num_nodes_per_token, rel=0.01)
    np.testing.assert_allclose(mc.num_selections_per_rank.sum(), K)


@pytest.mark.parametrize("E,K,R,G,NG,M", [
    (64, 4, 16, 8, 8, 2),    # ranks inside groups, nodes of whole groups
    (48, 4, 4, 2, 3, 2),     # groups of 16 straddle ranks of 12
])
def test_group_limited_sampling_matches_a_slow_reference(E, K, R, G, NG, M):
    got = expected_reach(E, K, R, G, num_groups=NG, num_topk_groups=M, seed=4)
    assert got.method == "Monte Carlo, 20000 tokens, seed 4"
    ref = Reach.from_topk_idx(_reference_topk(E, K, NG, M, 3000, seed=5), E, R, G)
    np.testing.assert_allclose(got.prob_token_in_rank, ref.prob_token_in_rank, atol=0.03)
    np.testing.assert_allclose(got.prob_token_in_node, ref.prob_token_in_node, atol=0.03)
    assert got.num_nodes_per_token == pytest.approx(ref.num_nodes_per_token, rel=0.02)
    # fixed seed: the same numbers every time
    again = expected_reach(E, K, R, G, num_groups=NG, num_topk_groups=M, seed=4)
    np.testing.assert_array_equal(got.prob_token_in_rank, again.prob_token_in_rank)


def test_node_limited_is_groups_on_nodes_and_never_exceeds_the_limit():
    by_nodes = expected_reach(256, 8, 64, 8, max_nodes=4, num_samples=5000)
    by_groups = expected_reach(256, 8, 64, 8, num_groups=8, num_topk_groups=4, num_samples=5000)
    np.testing.assert_array_equal(by_nodes.prob_token_in_node, by_groups.prob_token_in_node)
    assert 3.8 < by_nodes.num_nodes_per_token <= 4.0
    # all top-4 groups allowed is plain uniform routing: the closed form, not sampling
    assert expected_reach(256, 8, 32, 8, max_nodes=4).method == "exact"


def test_measured_loads_send_tokens_where_the_load_is():
    E, K, R, G = 32, 2, 8, 4
    loads = np.zeros(E)
    loads[[0, 1]] = 1.0                             # only rank 0's experts are ever used
    reach = expected_reach(E, K, R, G, expert_loads=loads, num_samples=500)
    np.testing.assert_array_equal(reach.prob_token_in_rank, np.eye(R)[0])
    np.testing.assert_array_equal(reach.num_selections_per_rank, 2 * np.eye(R)[0])
    skewed = expected_reach(E, K, R, G, expert_loads=np.arange(1, E + 1, dtype=float))
    assert np.all(np.diff(skewed.prob_token_in_rank) > 0)   # hotter experts live on later ranks
    assert skewed.num_selections_per_rank.sum() == pytest.approx(K)


# ------------------------------------------------------------------------------------------ bytes


def test_bytes_per_token():
    assert bytes_per_token(7168, fp8=True) == 7168 + 7168 // 128 * 4 == 7392
    assert bytes_per_token(7168, fp8=False) == 2 * 7168


def test_link_bytes_equal_dedup_counts_of_a_concrete_routing():
    E, K, R, G, T = 64, 6, 16, 4, 400
    N, b = R // G, 1000.0
    g = torch.Generator().manual_seed(6)
    topk_idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    topk_idx[0, 0] = -1                             # "no expert" is ignored
    reach = Reach.from_topk_idx(topk_idx, E, R, G)
    rank_idx = topk_idx // (E // R)
    node_idx = rank_idx // G
    valid = topk_idx >= 0
    pairs_rank = {(t, int(r)) for t in range(T) for r, v in zip(rank_idx[t], valid[t]) if v}
    pairs_node = {(t, int(n)) for t in range(T) for n, v in zip(node_idx[t], valid[t]) if v}
    # rank 0 sends T tokens of this routing (every rank routes alike, see the module docstring)
    hier = link_bytes(reach, T, b, hierarchical=True)
    assert hier.rdma_send[0] == pytest.approx(b * sum(1 for _, n in pairs_node if n != 0))
    # forwarder 0 passes the tokens of all N senders with local index 0 to ranks 1..G-1
    assert hier.nvlink_send[0] == pytest.approx(b * N * sum(1 for _, r in pairs_rank if 0 < r < G))
    flat = link_bytes(reach, T, b)
    assert flat.rdma_send[0] == pytest.approx(b * sum(1 for _, r in pairs_rank if r >= G))
    assert flat.nvlink_send[0] == pytest.approx(b * sum(1 for _, r in pairs_rank if 0 < r < G))
    ll = link_bytes(reach, T, b, low_latency=True)
    assert ll.rdma_send[0] == pytest.approx(b * int((rank_idx[valid] >= G).sum()))
    for lb in (hier, flat, ll):                     # what is sent is received
        assert lb.nvlink_send.sum() == pytest.approx(lb.nvlink_recv.sum())
        assert lb.rdma_send.sum() == pytest.approx(lb.rdma_recv.sum())
    assert hier.rdma_max < flat.rdma_max            # dedup per node is why hierarchical exists


def test_time_is_latency_plus_bytes_over_bandwidth():
    spec = ClusterSpec(nodes=1, gpus_per_node=8, nvlink_GBps=100.0, nvlink_latency_us=2.0, kernel_us=10.0)
    reach = expected_reach(256, 8, 8, 8)
    res = simulate_dispatch_combine(spec, reach, num_tokens=1000, hidden=1024, fp8=True)
    p = reach.prob_token_in_rank[0]
    nvl = 1000 * (1024 + 32) * p * 7                 # each rank receives from its 7 peers
    assert res.dispatch.nvlink_bytes == pytest.approx(nvl)
    assert res.dispatch.time_us == pytest.approx(10.0 + 2.0 + nvl / 100e3)
    assert res.combine.nvlink_bytes == pytest.approx(nvl * 2048 / 1056)
    assert res.dispatch.rdma_bytes == 0 and res.dispatch.bottleneck == "nvlink"
    assert res.dispatch.deepep_GBps == pytest.approx(1000 * 8 * p * 1056 / (res.dispatch.time_us * 1e3))


# ------------------------------------------------------------------------------------------ DeepEP


@pytest.fixture(scope="module")
def comparisons():
    return compare_deepep()


def test_every_published_deepep_figure_within_15_percent(comparisons):
    assert [c.row for c in comparisons] == list(DEEPEP_H800)
    for c in comparisons:
        for phase, err in (("dispatch", c.dispatch_error), ("combine", c.combine_error)):
            assert abs(err) < 0.15, f"EP{c.row.num_ranks} {'LL' if c.row.low_latency else 'normal'} {phase}: {err:+.1%}"


def test_deepep_rows_use_deepeps_routing(comparisons):
    by = {(c.row.low_latency, c.row.num_ranks): c.result for c in comparisons}
    assert by[False, 8].reach.num_ranks_per_token == pytest.approx(8 * (1 - _miss(256, 8, 32)))
    assert by[False, 16].reach.num_nodes_per_token == pytest.approx(2 * (1 - _miss(256, 8, 128)))
    # EP64: top-4 of 8 node groups, group score = best expert's score (DeepEP's test)
    ref = Reach.from_topk_idx(_reference_topk(256, 8, 8, 4, 1000, seed=7), 256, 64, 8)
    assert by[False, 64].reach.num_nodes_per_token == pytest.approx(ref.num_nodes_per_token, rel=0.01)
    assert by[False, 64].hierarchical and not by[True, 64].hierarchical
    assert by[True, 8].dispatch_bytes_per_token == 7392 + 16


# ------------------------------------------------------------------------------------------ CLI


def test_cli_prints_the_comparison_by_default(capsys):
    assert main(["simulate"]) == 0
    out = capsys.readouterr().out
    assert "intranode      8  dispatch    153 GB/s" in out
    assert "low-latency  256  combine     360 us" in out
    worst = max(max(abs(c.dispatch_error), abs(c.combine_error)) for c in compare_deepep())
    assert f"largest |error|: {worst:.1%}" in out


def test_cli_models_a_cluster(capsys):
    assert main(["simulate", "--nodes", "2", "--fp8", "--hierarchical", "--compare-deepep"]) == 0
    out = capsys.readouterr().out
    reach = expected_reach(256, 8, 16, 8)
    res = simulate_dispatch_combine(ClusterSpec(nodes=2, gpus_per_node=8), reach, num_tokens=4096, hidden=7168,
                                    hierarchical=True)
    assert f"reach per token: {reach.num_ranks_per_token:.3f} of 16 ranks, {reach.num_nodes_per_token:.3f} of 2 nodes" in out
    assert f"dispatch  {res.dispatch.time_us:>8.1f} us" in out
    assert "dispatch 7392 (FP8), combine 14336 (bf16)" in out
    assert "largest |error|" in out


@pytest.mark.parametrize("fmt", ["npy", "csv", "json"])
def test_cli_reads_a_load_file(tmp_path, capsys, fmt):
    loads = np.random.default_rng(0).pareto(1.1, (3, 64)) + 0.1
    src = tmp_path / f"loads.{fmt}"
    write_loads(src, loads)
    args = ["simulate", "--nodes", "2", "--gpus-per-node", "4", "--experts", "64", "--loads", str(src),
            "--samples", "2000"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 layers: dispatch+combine mean" in out and "Monte Carlo, 2000 tokens, seed 0" in out
    assert main(args + ["--layer", "1", "--low-latency", "--tokens", "128"]) == 0
    assert "low-latency" in capsys.readouterr().out


def test_cli_bad_input_is_a_named_error(capsys):
    assert main(["simulate", "--nodes", "3"]) == 2
    assert "num_experts (256) must split evenly over 24 ranks" in capsys.readouterr().err
    assert main(["simulate", "--nodes", "2", "--low-latency", "--hierarchical"]) == 2
    assert "cannot be hierarchical" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ errors


def test_bad_input_raises_naming_the_argument():
    with pytest.raises(ValueError, match=r"num_experts \(100\) must split evenly over 16 ranks"):
        expected_reach(100, 8, 16, 8)
    with pytest.raises(ValueError, match=r"num_topk must be in \[1, num_experts=16\], got num_topk=17"):
        expected_reach(16, 17, 4, 2)
    with pytest.raises(ValueError, match=r"num_topk=8 is more than the 4 experts in 1 of 4 groups"):
        expected_reach(16, 8, 4, 2, num_groups=4, num_topk_groups=1)
    with pytest.raises(ValueError, match=r"max_nodes must be in \[1, nodes=2\], got max_nodes=3"):
        expected_reach(256, 8, 16, 8, max_nodes=3)
    with pytest.raises(ValueError, match=r"num_groups must divide num_experts=256, got num_groups=7"):
        expected_reach(256, 8, 16, 8, num_groups=7)
    with pytest.raises(ValueError, match=r"num_ranks \(12\) must be a multiple of gpus_per_node, got gpus_per_node=8"):
        expected_reach(96, 8, 12, 8)
    with pytest.raises(ValueError, match=r"expert_loads must be \[num_experts=64\], got shape \(32,\)"):
        expected_reach(64, 8, 8, 8, expert_loads=np.ones(32))
    with pytest.raises(ValueError, match="expert_loads has 2 experts with load > 0, fewer than num_topk=4"):
        expected_reach(64, 4, 8, 8, expert_loads=np.eye(64)[0] + np.eye(64)[1])
    with pytest.raises(ValueError, match=r"hidden must be a multiple of 128 for FP8, got hidden=100"):
        bytes_per_token(100, fp8=True)
    with pytest.raises(ValueError, match=r"rdma_GBps must be a positive number, got rdma_GBps=0"):
        ClusterSpec(nodes=2, gpus_per_node=8, rdma_GBps=0)
    with pytest.raises(ValueError, match=r"nodes must be a positive int, got nodes=0"):
        ClusterSpec(nodes=0, gpus_per_node=8)
    with pytest.raises(ValueError, match="reach is for 8 ranks / 8 per node, the cluster has 16 / 8"):
        simulate_dispatch_combine(ClusterSpec(nodes=2, gpus_per_node=8), expected_reach(256, 8, 8, 8),
                                  num_tokens=128, hidden=7168)
    with pytest.raises(ValueError, match="low_latency .* cannot be hierarchical"):
        link_bytes(expected_reach(256, 8, 16, 8), 128, 7392.0, hierarchical=True, low_latency=True)
