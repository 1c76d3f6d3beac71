"""The route as data (moeflow.comm.plan), without processes: every rank's hops are built in one
process and their messages delivered by a small in-process simulation, so the plan alone must
bring each token to the right ranks, in the flat layout, with the node-dedup byte minimum."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from moeflow import layout
from moeflow.comm.plan import CountTable, Plan, RowFormat, RowMeta, flat_hop, in_node_hop, pack_meta, rail_hop

from _reference import ref_combine, ref_dispatch


def _deliver(hops, inputs, gather=True):
    """Run one hop for every rank: ``inputs[r]`` rows of rank r (gathered by ``send_idx``, or
    already in send order). Returns each rank's output and the rows that crossed, per (src, dst)."""
    queues = defaultdict(list)
    crossed = defaultdict(int)
    for r, hop in enumerate(hops):
        so = hop.send_offsets
        for k, p in enumerate(hop.send_peers):
            rows = inputs[r][hop.send_idx[so[k]:so[k + 1]]] if gather else inputs[r][so[k]:so[k + 1]]
            queues[r, p].append(rows)
            crossed[r, p] += rows.size(0)
    outs = []
    for q, hop in enumerate(hops):
        parts = []
        for k, p in enumerate(hop.recv_peers):
            rows = queues[p, q].pop(0)  # the k-th message from p to q
            assert rows.size(0) == hop.recv_counts[k], (p, q, k)
            parts.append(rows)
        outs.append(torch.cat(parts) if parts else inputs[q][:0])
    assert not any(queues.values()), "a message was sent but never received"
    return outs, crossed


def _routing(R, E, T, seed):
    g = torch.Generator().manual_seed(seed)
    idxs = []
    for r in range(R):
        idx = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(T[r])]) if T[r] else \
            torch.empty(0, 3, dtype=torch.int64)
        idx[torch.rand(idx.shape, generator=g) < 0.2] = -1
        idxs.append(idx)
    return idxs


def _plans(idxs, E, R, P):
    """Every rank's plan; the in-node hop is built from what the rail hop delivered, as the Buffer does."""
    in_rank = [layout.is_token_in_rank(idx, E, R) for idx in idxs]
    num_recv = [[int(in_rank[s][:, d].sum()) for s in range(R)] for d in range(R)]
    if P == R:
        return [Plan((flat_hop(in_rank[r], num_recv[r]),), idxs[r].size(0)) for r in range(R)], in_rank
    N = R // P
    in_node = [layout.is_token_in_node(t, N) for t in in_rank]
    rail_recv = [[int(in_node[m * P + r % P][:, r // P].sum()) for m in range(N)] for r in range(R)]
    rails = [rail_hop(in_node[r], r, P, rail_recv[r]) for r in range(R)]
    # each rail row carries the sender's rank mask for the destination node
    masks = [in_rank[r].view(-1, N, P)[rails[r].send_idx, rails[r].send_peer_of_rows() // P] for r in range(R)]
    got_masks, _ = _deliver(rails, masks, gather=False)
    hops = [in_node_hop(got_masks[r], rails[r], r, P, num_recv[r]) for r in range(R)]
    return [Plan((rails[r], hops[r]), idxs[r].size(0)) for r in range(R)], in_rank


def _forward(plans, rows):
    for h in range(len(plans[0].hops)):
        rows, crossed = _deliver([p.hops[h] for p in plans], rows)
    return rows


@pytest.mark.parametrize("R,P", [(3, 3), (4, 2), (8, 4), (6, 3), (4, 1)])
def test_hops_bring_each_token_to_its_ranks_in_the_flat_layout(R, P):
    E = 4 * R
    T = [7 + 5 * r for r in range(R)]
    T[1] = 0  # a rank with no tokens still takes part
    idxs = _routing(R, E, T, seed=R * 10 + P)
    plans, in_rank = _plans(idxs, E, R, P)
    # payload: (source rank, token) of each token, so the layout can be read off the rows
    tags = [torch.stack([torch.full((T[r],), r), torch.arange(T[r])], 1) for r in range(R)]
    got = _forward(plans, tags)
    ref = ref_dispatch([t.float() for t in tags], idxs, None, E)
    for d in range(R):
        assert got[d].tolist() == [list(o) for o in ref[d]["origin"]], f"rank {d}"
        assert plans[d].num_recv == len(ref[d]["origin"])


@pytest.mark.parametrize("R,P", [(4, 2), (8, 4), (6, 2)])
def test_rail_hop_crosses_nodes_once_per_token_and_node(R, P):
    E, N = 4 * R, R // P
    idxs = _routing(R, E, [9 + r for r in range(R)], seed=R + P)
    plans, in_rank = _plans(idxs, E, R, P)
    _, crossed = _deliver([p.hops[0] for p in plans], [torch.zeros(idx.size(0), 1) for idx in idxs])
    for s in range(R):
        in_node = layout.is_token_in_node(in_rank[s], N)
        for d in range(R):
            if d // P != s // P:
                expect = int(in_node[:, d // P].sum()) if d % P == s % P else 0
                assert crossed.get((s, d), 0) == expect, (s, d)
    # the in-node hop never leaves a node
    _, crossed = _deliver([p.hops[1] for p in plans], _forward([Plan(p.hops[:1], p.num_tokens) for p in plans],
                                                               [torch.zeros(idx.size(0), 1) for idx in idxs]))
    assert all(s // P == d // P for (s, d), n in crossed.items() if n)


def _backward(plans, rows):
    """The plans run backward: each hop's rows back to their senders, summed per input row in fp32,
    in message order (what moeflow.comm.route.backward does, here with plain loops)."""
    for h in range(len(plans[0].hops) - 1, -1, -1):
        hops = [p.hops[h] for p in plans]
        back = [_reverse(hop) for hop in hops]
        returned, _ = _deliver(back, rows, gather=False)
        rows = []
        for r, hop in enumerate(hops):
            size = plans[r].num_tokens if h == 0 else plans[r].hops[h - 1].num_recv
            acc = torch.zeros(size, returned[r].size(1))
            acc.index_add_(0, hop.send_idx, returned[r].float())
            rows.append(acc)
    return rows


def _reverse(hop):
    from moeflow.comm.plan import Hop

    return Hop(torch.arange(hop.num_recv), hop.recv_peers, hop.recv_counts, hop.send_peers, hop.send_counts)


@pytest.mark.parametrize("R,P", [(4, 4), (4, 2), (8, 2)])
def test_backward_sums_each_tokens_copies(R, P):
    E = 2 * R
    idxs = _routing(R, E, [6 + r for r in range(R)], seed=7 * R + P)
    plans, _ = _plans(idxs, E, R, P)
    xs = [torch.randn(idx.size(0), 4) for idx in idxs]
    recv = _forward(plans, xs)
    ys = [2.0 * y + d for d, y in enumerate(recv)]  # "experts": anything row-wise, per rank
    got = _backward(plans, ys)
    ref = ref_dispatch(xs, idxs, None, E)
    exp, _ = ref_combine(ys, [r["origin"] for r in ref], [x.size(0) for x in xs], 4, torch.float32)
    for s in range(R):
        torch.testing.assert_close(got[s], exp[s], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("R,P", [(4, 4), (4, 2), (6, 3)])
def test_count_table_gives_every_rank_the_row_matrix_and_its_own_counts(R, P):
    """Every rank's table through a simulated all-to-all (row r to rank r): each rank reads the
    [R, R] row matrix, every rank's num_worst_tokens and signature, its rail-hop rows and its
    per-expert counts; a failed rank's table says so and nothing else."""
    g = torch.Generator().manual_seed(R * 10 + P)
    E, K, T = 2 * R, 3, [5 + r for r in range(R)]
    idxs = [torch.randint(-1, E, (t, K), generator=g) for t in T]
    table = CountTable(R, P, E // R, signature_cols=6)
    sent = []
    for r in range(R):
        per_rank, per_expert, in_rank = layout.dispatch_layout(idxs[r], E, R)
        sent.append(table.pack(r, (7, 1, E, K, 1, 0), in_rank, per_expert, num_worst_tokens=100 + r))
    layouts = [layout.dispatch_layout(i, E, R) for i in idxs]
    matrix = torch.stack([lay[0] for lay in layouts]).long()                # [R, R]
    for d in range(R):
        recv = torch.stack([sent[s][d] for s in range(R)])                  # what rank d receives
        assert table.bad_ranks(recv) == [] and torch.equal(table.matrix(recv), matrix)
        assert table.num_worst_tokens(recv) == [100 + s for s in range(R)]
        assert table.signatures(recv).tolist() == [[7, 1, E, K, 1, 0]] * R
        assert table.num_recv_per_expert(recv) == sum(lay[1].view(R, -1)[d] for lay in layouts).tolist()
        rail = table.rail(recv, d)
        if P == R:
            assert rail is None
        else:  # from each node's rank with d's local index: its tokens reaching d's node
            peers = [m * P + d % P for m in range(R // P)]
            assert rail == [int(layout.is_token_in_node(layouts[s][2], R // P)[:, d // P].sum()) for s in peers]
    failed = table.failed(torch.device("cpu"))
    assert failed.shape == sent[0].shape and table.bad_ranks(failed) == list(range(R)) and failed[:, 1:].eq(0).all()


def test_row_format_fields_are_aligned_and_round_trip():
    fmt = RowFormat.meta(scale_cols=3, num_topk=5, has_weights=True, ids_dtype=torch.int8, mask_cols=2)
    assert [fmt.offset(n) for n in ("scales", "weights", "ids", "src", "mask")] == [0, 16, 40, 48, 56]
    assert fmt.width == 64
    g = torch.Generator().manual_seed(0)
    T, K, L = 6, 5, 4
    meta = RowMeta(torch.randn(T, 3, generator=g), torch.randint(-1, 3 * L, (T, K), generator=g),
                   torch.rand(T, K, generator=g))
    idx = torch.tensor([4, 0, 2])
    dst = torch.tensor([1, 1, 2])
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    rows = pack_meta(fmt, meta, idx, dst_rank=dst, num_local_experts=L, mask=mask)
    back = RowMeta.of(fmt, rows)
    assert torch.equal(back.scales, meta.scales[idx])
    local, weights = layout.local_topk(meta.topk_idx[idx], meta.topk_weights[idx], dst, L)
    assert torch.equal(back.topk_idx.long(), local) and torch.equal(back.topk_weights, weights)
    assert torch.all(back.topk_weights[local < 0] == 0) and bool((local < L).all())
    assert torch.equal(fmt.view(rows, "mask", torch.bool), mask)
    # the first hop's rows carry their own index as the source token; later hops forward it
    assert torch.equal(back.src, idx.int())
    forwarded = RowMeta.of(fmt, pack_meta(fmt, back, torch.tensor([2, 0])))
    assert torch.equal(forwarded.src, idx[[2, 0]].int())
    # without a destination the ids stay global (the rail hop's rows)
    glob = RowMeta.of(fmt, pack_meta(fmt, meta, idx))
    assert torch.equal(glob.topk_idx.long(), meta.topk_idx[idx])


def test_local_topk_keeps_the_destinations_experts_and_zeroes_the_rest_bit_exactly():
    g = torch.Generator().manual_seed(3)
    rows, K, L, R = 40, 4, 3, 4
    ids = torch.randint(-1, L * R, (rows, K), generator=g)
    ids[0] = -1
    weights = torch.rand(rows, K, generator=g)
    weights[1, :2] = torch.tensor([float("nan"), float("inf")])
    weights[2, :2] = torch.tensor([-0.0, float("-inf")])
    dst = torch.randint(0, R, (rows,), generator=g)
    dst[1:3] = 0
    ids[1, :2] = L * R - 1  # NaN and Inf on another rank's expert: +0.0
    ids[2, :2] = torch.tensor([0, L * R - 1])  # -0.0 on this one's: kept
    local, local_w = layout.local_topk(ids, weights, dst, L)
    for i in range(rows):
        for k in range(K):
            e = int(ids[i, k])
            mine = e >= 0 and e // L == int(dst[i])
            assert int(local[i, k]) == (e % L if mine else -1)
            want = weights[i, k] if mine else torch.tensor(0.0)  # +0.0, whatever the weight was
            assert local_w[i, k].view(torch.int32) == want.view(torch.int32), (i, k)


@pytest.mark.parametrize("R", [1, 2, 3, 8])
def test_dispatch_layout_counts_tokens_per_rank_and_pairs_per_expert(R):
    (idx,) = _routing(1, 6 * R, [50], seed=R)
    per_rank, per_expert, in_rank = layout.dispatch_layout(idx, 6 * R, R)
    want = torch.zeros(50, R, dtype=torch.bool)
    for t, e in (idx >= 0).nonzero().tolist():
        want[t, int(idx[t, e]) // 6] = True
    assert torch.equal(in_rank, want)
    assert torch.equal(per_rank, want.sum(0, dtype=torch.int32))
    assert per_expert.tolist() == [int((idx == e).sum()) for e in range(6 * R)]


@pytest.mark.parametrize("listed", [50, 510])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_two_source_sum_in_the_output_dtype_is_the_fp32_sum(dtype, listed):
    """MoELayer on two ranks sums at most two copies per token; that sum is done in the output's
    dtype (no fp32 pass), which must be bit-identical to the fp32 accumulation, edge values too.
    50 of 64 tokens per segment: short spans, indexed ops; 510 of 512: long spans, one op each."""
    from moeflow.comm.route import _Sum, reduce_rows

    T, W = {50: 64, 510: 512}[listed], 16
    g = torch.Generator().manual_seed(3)
    idx = [torch.randperm(T, generator=g)[:listed].sort().values for _ in range(2)]
    segs = [(torch.randn(listed, W, generator=g) * torch.logspace(-6, 6, W)).to(dtype) for _ in range(2)]
    edge = torch.tensor([1e30, 1.0, 3.0, 2 ** -9, 65504.0, 1e-30, float("inf"), 0.5])
    idx[1][0] = idx[0][0]  # the edge row is summed from both
    segs[0][0, :8], segs[1][0, :8] = edge.to(dtype), torch.tensor([1e-5, 2 ** -9, 2 ** -7, -1.0, 1.0, -1e-30,
                                                                      1.0, 2 ** -10]).to(dtype)
    fp32 = torch.zeros(T, W)
    for s, i in zip(segs, idx):
        fp32.index_add_(0, i, s.float())
    blockwise = torch.empty(T, W, dtype=dtype)
    reduce_rows(blockwise, segs, idx)
    direct = torch.full((T, W), 7.0, dtype=dtype)  # stale values must not survive
    total = _Sum(direct, idx, (), [1], {dtype})
    assert total.direct
    assert (total.spans is not None) == (listed == 510)
    total.own(segs)   # this rank's own segment first (it needs no transfer), the other after
    total.rest(segs)
    pieces = torch.full((T, W), 7.0, dtype=dtype)  # the other segment arriving in three pieces
    total = _Sum(pieces, idx, (), [1], {dtype})
    total.own(segs)
    for upto in (listed // 3, listed // 3, 2 * listed // 3 + 1, None):  # a limit may cut a span, or repeat
        total.rest(segs, upto)
    for got in (blockwise, direct, pieces):
        assert torch.equal(got.view(torch.uint8), fp32.to(dtype).view(torch.uint8))
    assert not _Sum(direct, idx + [idx[0]], (), [0], {dtype}).direct  # three sources: fp32, in order


def test_combine_messages_travel_in_pieces_only_between_two_peers_on_cpu():
    from moeflow.comm.route import _piece_cuts

    assert _piece_cuts(4075, 2, cpu=True) == [(0, 1018), (1018, 2037), (2037, 3056), (3056, 4075)]
    assert _piece_cuts(1100, 2, cpu=True) == [(0, 550), (550, 1100)]
    assert _piece_cuts(1000, 2, cpu=True) == [(0, 1000)]
    assert _piece_cuts(4075, 3, cpu=True) == [(0, 4075)]     # three peers: summed after all arrived
    assert _piece_cuts(4075, 2, cpu=False) == [(0, 4075)]    # NCCL: one message, summed by kernels
    assert _piece_cuts(0, 2, cpu=True) == []


def test_spans_cut_tokens_where_their_sources_change():
    from moeflow.comm.plan import token_spans as _spans

    T = 256
    own = torch.cat([torch.arange(0, 30), torch.arange(31, T)])    # token 30 missing
    peer = torch.arange(10, T)                                     # tokens 0-9 missing
    assert _spans([own, peer], T) == [(0, 10, [(0, 0)]), (10, 30, [(0, 10), (1, 0)]), (30, 31, [(1, 20)]),
                                      (31, T, [(0, 30), (1, 21)])]
    assert _spans([own, torch.arange(0, 64, 2)], T) is None          # every other token: spans of 1
    assert _spans([torch.arange(5)], 5) is None                      # too few tokens to pay


@pytest.mark.parametrize("listed", [0, 10, 25, 49, 50])
def test_place_rows_puts_each_row_at_its_token_and_zeros_the_rest(listed):
    # both ways of placing (a gather when at least half the rows are listed, else a scatter)
    from moeflow.comm.route import _place_rows

    T, W = 50, 6
    g = torch.Generator().manual_seed(listed)
    idx = torch.randperm(T, generator=g)[:listed].sort().values
    rows = torch.randn(listed, W, generator=g).bfloat16()
    out = torch.full((T, W), 7.0, dtype=torch.bfloat16)  # stale values must not survive
    _place_rows(out, idx, rows)
    expected = torch.zeros(T, W, dtype=torch.bfloat16)
    expected[idx] = rows
    assert torch.equal(out, expected)


def test_runs_between_cuts_around_the_gaps_and_refuses_short_runs():
    from moeflow.comm.plan import MIN_RUN_ROWS, runs_between

    assert runs_between([3, 4, 10], 100) == ((0, 3), (5, 5), (11, 89))
    assert runs_between([], 64) == ((0, 64),)
    assert runs_between([0, 63], 64) == ((1, 62),)
    assert runs_between(list(range(64)), 64) == ()                    # nothing sent: no message at all
    assert runs_between(None, 100) is None                            # no gap list: gather
    assert runs_between([3, 4, 10], 3 * MIN_RUN_ROWS + 2) is None     # 3 runs of 32 rows on average


def test_gap_lists_make_both_sides_cut_each_message_into_the_same_runs():
    """Through a simulated count exchange: a message the sender cuts into runs is expected in
    the same runs by its receiver, and the runs' rows are the message's rows, in order."""
    R, E, T = 3, 6, [300, 260, 280]
    g = torch.Generator().manual_seed(5)
    idxs = [torch.stack([torch.randperm(E, generator=g)[:5] for _ in range(t)]) for t in T]
    for idx, drop in zip(idxs, (0.02, 0.02, 0.4)):  # rank 2 leaves out many tokens: its messages are gathered
        idx[torch.rand(idx.shape, generator=g) < drop] = -1
    table = CountTable(R, R, E // R, signature_cols=6, gap_cols=16)
    in_rank = [layout.is_token_in_rank(idx, E, R) for idx in idxs]
    sent = [table.pack(r, (0,) * 6, in_rank[r], None, 0) for r in range(R)]
    recv = [torch.stack([sent[s][d] for s in range(R)]) for d in range(R)]
    hops = []
    for d in range(R):
        gaps = table.gaps(recv[d])
        for s in range(R):
            missing = (~in_rank[s][:, d]).nonzero().flatten().tolist()
            assert gaps[s] == (missing if len(missing) <= 16 else None)
        hops.append(flat_hop(in_rank[d], table.matrix(recv[d])[:, d].tolist(), (table.gaps(sent[d]), gaps), d))
    cut = 0
    for s in range(R):
        for d in range(R):
            runs = hops[s].send_runs[d]
            assert runs == hops[d].recv_runs[s] and (runs is None or s != d)
            if runs is not None:
                cut += 1
                so = hops[s].send_offsets
                rows = torch.cat([torch.arange(first, first + n) for first, n in runs])
                assert torch.equal(rows, hops[s].send_idx[so[d]:so[d + 1]])
                assert sum(n for _, n in runs) == hops[d].recv_counts[s]
    assert 0 < cut < R * (R - 1)  # some messages travel in runs, some are gathered
    assert table.gaps(recv[0]) is not None and CountTable(R, R, E // R, 6).gaps(recv[0][:, :-17]) is None
