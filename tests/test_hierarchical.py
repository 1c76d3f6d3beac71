"""Node-aware dispatch / combine on emulated nodes (local Gloo ranks, ``ranks_per_node`` given):
identical to the flat dispatch and to the single-process reference; inter-node bytes equal to the
per-node-dedup minimum plus the documented metadata row."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moeflow import Buffer, spawn

from _reference import ref_combine, ref_dispatch
from test_buffer import _as_on_gpu, expert_fn, make_case_inputs


def _cases(R: int) -> list[dict]:
    E = 4 * R
    return [
        dict(name="random-bf16-weights", seed=31, N=[14 + 3 * r for r in range(R)], H=256, E=E, K=3, drop=0.2),
        dict(name="fp8", seed=32, N=[9 + r for r in range(R)], H=256, E=E, K=4, fp8=True, drop=0.1),
        dict(name="fp32-async", seed=33, N=12, H=64, E=E, K=2, dtype=torch.float32, async_=True),
        dict(name="fp8-async", seed=34, N=10, H=128, E=E, K=2, fp8=True, async_=True),
        dict(name="zero-tokens-on-rank-1", seed=35, N=[0 if r == 1 else 11 for r in range(R)], H=64, E=E, K=2),
        dict(name="all-minus-one", seed=36, N=7, H=64, E=E, K=2, pattern="all_neg"),
        dict(name="one-expert-on-last-node", seed=37, N=9, H=64, E=E, K=2, pattern="one_expert", expert=E - 1),
        dict(name="many-experts-top-8", seed=38, N=24, H=128, E=64, K=8, align=4),
    ]


def _round(buffer, case, x, idx, w, P):
    a = case.get("async_", False)
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, case["E"])
    buffer.counters.reset()
    recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w,
        expert_alignment=case.get("align", 1), async_finish=a)
    pending = event.is_pending()
    event.current_stream_wait()
    y = expert_fn(recv_x)
    combined, combined_w, event = buffer.combine(y, handle, topk_weights=recv_w, async_finish=a)
    event.current_stream_wait()
    c = buffer.counters
    wire = {k: (c.wire_bytes(k, scope="inter_node", ranks_per_node=P),
                c.wire_bytes(k, direction="recv", scope="inter_node", ranks_per_node=P),
                c.wire_bytes(k, scope="intra_node", ranks_per_node=P)) for k in ("dispatch", "combine")}
    cached_x, c_idx, _, _, _, event = buffer.dispatch(x, handle=handle, async_finish=a)
    event.current_stream_wait()
    plain, none_w, _ = buffer.combine(y, handle)
    bias = torch.full_like(plain, 0.5)
    biased, _, _ = buffer.combine(y, handle, bias=(bias, bias))
    return dict(biased=biased, recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w, counts=counts, combined=combined,
                src=handle.recv_src_idx, handle_tuple=tuple(handle),
                combined_w=combined_w, cached_x=cached_x, cached_idx=c_idx, plain=plain, none_w=none_w,
                per_node=per_node, pending=pending, wire=wire, y=y)


def _run(cases, ranks_per_node, as_on_gpu=False):
    R, rank = dist.get_world_size(), dist.get_rank()
    node_aware = Buffer(dist.group.WORLD, ranks_per_node=ranks_per_node)
    flat = Buffer(dist.group.WORLD, ranks_per_node=R)
    if as_on_gpu:
        _as_on_gpu()
    assert node_aware.num_nodes == R // ranks_per_node and flat.num_nodes == 1
    out = []
    for case in cases:
        x, idx, w = make_case_inputs(case, rank, R)
        out.append(dict(x=x, idx=idx, w=w, node=_round(node_aware, case, x, idx, w, ranks_per_node),
                        flat=_round(flat, case, x, idx, w, ranks_per_node)))
    return out


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(p, q) for p, q in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def _check(case, outs, R, P):
    G, name = R // P, case["name"]
    xs, idxs, ws = [o["x"] for o in outs], [o["idx"] for o in outs], [o["w"] for o in outs]
    ref = ref_dispatch(xs, idxs, ws, case["E"], case.get("align", 1))
    fp8 = bool(case.get("fp8"))
    for d, (o, exp) in enumerate(zip(outs, ref)):
        got, flat = o["node"], o["flat"]
        where = f"{name}, rank {d}"
        # identical to the flat dispatch, bit for bit, and to the reference
        for key in ("recv_x", "recv_idx", "recv_w", "cached_x", "src"):
            assert _equal(got[key], flat[key]), f"{where}: {key} differs from the flat dispatch"
        assert got["src"].tolist() == [t for _, t in exp["origin"]], f"{where}: recv_src_idx"
        # DeepEP's internode handle: entry 6 ends each source's block of recv_x, entry 5 starts it
        ends = torch.tensor([len(exp["origin"]) - sum(1 for s, _ in exp["origin"] if s > r) for r in range(R)])
        assert len(got["handle_tuple"]) == 10 and len(flat["handle_tuple"]) == 6, where
        assert torch.equal(got["handle_tuple"][6], ends.int()), where
        assert torch.equal(flat["handle_tuple"][0][:, d], ends.int()), where
        assert got["counts"] == flat["counts"] == exp["counts"], where
        assert _equal(got["recv_x"][0] if fp8 else got["recv_x"], exp["recv_x"]), where
        if fp8:
            assert torch.equal(got["recv_x"][1], exp["recv_scales"]), where
        assert torch.equal(got["recv_idx"], exp["recv_topk_idx"]) and torch.equal(got["recv_w"], exp["recv_topk_weights"])
        assert got["cached_idx"] is None and got["none_w"] is None and flat["per_node"] is None
        # num_tokens_per_rdma_rank: tokens per node, from the layout
        L = case["E"] // R
        hit_nodes = [{int(e) // L // P for e in row if e >= 0} for row in o["idx"].tolist()]
        assert got["per_node"].tolist() == [sum(m in h for h in hit_nodes) for m in range(G)], where
        if case.get("async_") and exp["recv_x"].size(0) > 0:
            assert got["pending"], f"{where}: async dispatch returned an already-finished event"
        # inter-node bytes: one payload row + one metadata row per (token, other node), exactly
        rows = sum(len(h - {d // P}) for h in hit_nodes)
        H, K, E = case["H"], case["K"], case["E"]
        # an FP8 token is its payload and its scales (DeepEP's FP8 format): both count as payload
        payload = H + _pad8(4 * (H // 128)) if fp8 else H * o["x"].element_size()
        id_bytes = 1 if E <= 128 else 2
        meta = _pad8(4 * K) + _pad8(K * id_bytes) + _pad8(4) + _pad8(P)  # weights | ids | source | rank mask
        sent, recvd, _ = got["wire"]["dispatch"]
        assert sent == rows * (payload + meta), f"{where}: inter-node dispatch bytes {sent} != {rows} rows"
        # combine sends each row that came across back once, as a node's sum (+ summed weights)
        comb_row = H * got["y"].element_size() + 4 * K
        assert recvd % (payload + meta) == 0
        assert got["wire"]["combine"][0] == recvd // (payload + meta) * comb_row, f"{where}: inter-node combine"
        # the flat transport sends a row per (token, rank): at least as many cross-node bytes
        assert flat["wire"]["dispatch"][0] >= rows * payload
    # received inter-node bytes mirror the sent ones
    assert sum(o["node"]["wire"]["dispatch"][0] for o in outs) == sum(o["node"]["wire"]["dispatch"][1] for o in outs)
    # combine: the reference sum (fp32, then cast), to the rounding of a node's partial sum
    ys = [o["node"]["y"] for o in outs]
    num_tokens = [(x[0] if isinstance(x, tuple) else x).size(0) for x in xs]
    ref_comb, ref_w = ref_combine(ys, [e["origin"] for e in ref], num_tokens, case["H"], ys[0].dtype,
                                  [e["recv_topk_weights"] for e in ref])
    for s, o in enumerate(outs):
        got = o["node"]
        tol = dict(rtol=0, atol=1e-5) if ys[0].dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
        torch.testing.assert_close(got["combined"].float(), ref_comb[s].float(), **tol, msg=f"{name}, rank {s}")
        torch.testing.assert_close(got["combined_w"], ref_w[s], rtol=0, atol=1e-6)
        torch.testing.assert_close(got["combined"].float(), o["flat"]["combined"].float(), **tol)
        assert _equal(got["plain"], got["combined"]), f"{name}, rank {s}: combine is not deterministic"
        torch.testing.assert_close(got["biased"].float(), o["flat"]["biased"].float(), **tol)
        # a token held by at most one rank per node combines bit-identically to the flat path
        L = case["E"] // R
        single = torch.tensor([all(sum(1 for r in {int(e) // L for e in row if e >= 0} if r // P == m) <= 1
                                   for m in range(G)) for row in o["idx"].tolist()], dtype=torch.bool)
        assert torch.equal(got["combined"][single], o["flat"]["combined"][single]), f"{name}, rank {s}"


@pytest.mark.parametrize("world_size,ranks_per_node,as_on_gpu", [(4, 2, False), (8, 4, False), (4, 2, True)])
def test_node_aware_matches_flat_and_reference(world_size, ranks_per_node, as_on_gpu):
    """as_on_gpu: both routes take their CUDA/NCCL choices (test_buffer._as_on_gpu)."""
    cases = _cases(world_size)
    if world_size == 8:
        cases = [c for c in cases if c["name"] in ("random-bf16-weights", "fp8-async", "zero-tokens-on-rank-1",
                                                   "many-experts-top-8")]
    outs = spawn(_run, world_size, cases, ranks_per_node, as_on_gpu, timeout_s=240, collective_timeout_s=60)
    for i, case in enumerate(cases):
        _check(case, [outs[r][i] for r in range(world_size)], world_size, ranks_per_node)


def _elastic_both_routes():
    """ElasticBuffer on 2 nodes of 2 (node-aware plan) and on one node (flat plan), same input."""
    from moeflow import ElasticBuffer

    rank, R = dist.get_rank(), dist.get_world_size()
    T_max, H, K, E = 12, 128, 3, 4 * R
    g = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(T_max - rank, H, generator=g).bfloat16()
    idx = torch.topk(torch.rand(T_max - rank, E, generator=g), K, dim=1)[1]
    w = torch.rand(T_max - rank, K, generator=g)
    out = {}
    for name, P in (("node", 2), ("flat", R)):
        buffer = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=T_max, ranks_per_node=P)
        assert buffer._buffer.num_nodes == R // P
        got = {}
        for expand in (False, True):
            recv_x, recv_idx, recv_w, handle, _ = buffer.dispatch(x, idx, w, num_experts=E, do_expand=expand,
                                                                  expert_alignment=4, do_cpu_sync=not expand)
            y = (recv_x.float() * 2).bfloat16()
            combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w)
            got[expand] = (recv_x, recv_idx, recv_w, handle.recv_src_metadata, combined, combined_w)
        out[name] = got
    return out


def test_elastic_buffer_runs_the_node_aware_plan():
    """ElasticBuffer(ranks_per_node=2) on 4 ranks takes the Buffer's node-aware plan and returns
    what the flat plan returns: rows, ids, weights, recv_src_metadata, expanded layout, combine."""
    for rank, out in enumerate(spawn(_elastic_both_routes, 4, timeout_s=120)):
        for expand in (False, True):
            for i, (a, b) in enumerate(zip(out["node"][expand], out["flat"][expand])):
                assert (a is None and b is None) or torch.equal(a, b), (rank, expand, i)


def _bad_ranks_per_node():
    msgs = []
    for value in (3, 0, "2"):
        try:
            Buffer(ranks_per_node=value)
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def test_ranks_per_node_must_divide_group():
    for rank, msgs in enumerate(spawn(_bad_ranks_per_node, 4, timeout_s=60)):
        assert len(msgs) == 3
        assert all(f"on rank {rank}" in m and "dividing the group size 4" in m for m in msgs)
        assert "got 3" in msgs[0] and "got 0" in msgs[1] and "got '2'" in msgs[2]


def test_bench_reports_inter_node_bytes_against_the_per_node_minimum(tmp_path):
    """``moeflow bench --ranks-per-node``: inter-node dispatch bytes over the per-node-dedup
    minimum (FP8 scales counted as payload) is the documented metadata, under 3% at H = 2048."""
    import json

    from moeflow.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--ranks", "4", "--ranks-per-node", "2", "--tokens", "96", "--hidden", "2048",
                 "--experts", "16", "--topk", "4", "--iters", "1", "--warmup", "0", "--fp8",
                 "--json", str(out)]) == 0
    for r in json.loads(out.read_text()):
        token = 2048 + 64 if r["mode"] == "fp8" else 2 * 2048
        meta = 4 * 4 + 8 + 8 + 8                # weights | ids (4 bytes) | source (4) | rank mask (2), padded
        rows = r["min_inter_node_dispatch_bytes"] // token
        assert r["min_inter_node_dispatch_bytes"] == rows * token and rows > 0
        count_exchange = r["inter_node_dispatch_bytes"] - rows * (token + meta)
        assert 0 <= count_exchange < 0.005 * rows * token, r["mode"]   # a few counts per peer
        assert r["inter_node_metadata_overhead"] < 0.03, r
    assert main(["bench", "--ranks", "4", "--ranks-per-node", "3"]) == 2  # checked before any rank starts
