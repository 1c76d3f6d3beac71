"""Buffer dispatch / combine on local Gloo ranks against the single-process reference."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from moeflow import Buffer, spawn
from moeflow.quant import per_token_cast_back, per_token_cast_to_fp8

from _reference import ref_combine, ref_dispatch


# ----------------------------------------------------------------------------- inputs
def make_case_inputs(case: dict, rank: int, R: int):
    """Deterministic inputs of one rank for one case (the parent never needs to regenerate them:
    ranks return what they used)."""
    g = torch.Generator().manual_seed(1000 * case["seed"] + rank)
    N = case["N"][rank] if isinstance(case["N"], list) else case["N"]
    H, E, K = case["H"], case["E"], case["K"]
    pattern = case.get("pattern", "random")
    x = torch.randn(N, H, generator=g) if pattern != "constant" else torch.full((N, H), 0.75)
    if pattern == "all_neg":
        idx = torch.full((N, K), -1, dtype=torch.int64)
    elif pattern == "one_expert":
        idx = torch.full((N, K), -1, dtype=torch.int64)
        idx[:, 0] = case.get("expert", 0)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]) if N else \
            torch.empty(0, K, dtype=torch.int64)
        if case.get("drop", 0) and N:
            idx[torch.rand(N, K, generator=g) < case["drop"]] = -1
    w = torch.rand(N, K, generator=g)
    dtype = case.get("dtype", torch.bfloat16)
    xin = per_token_cast_to_fp8(x) if case.get("fp8") else x.to(dtype)
    return xin, idx, w


def expert_fn(recv_x):
    """What the 'experts' return for received rows: a deterministic per-row function of them."""
    if isinstance(recv_x, tuple):
        return per_token_cast_back(*recv_x, dtype=torch.bfloat16)
    return (recv_x.float() * 1.5 - 0.25).to(recv_x.dtype)


def cases_for(R: int) -> list[dict]:
    E = 4 * R
    return [
        dict(name="random-bf16", seed=1, N=[16 + 5 * r for r in range(R)], H=256, E=E, K=min(3, E), drop=0.2),
        dict(name="constant-fp32", seed=2, N=12, H=64, E=2 * R, K=2, dtype=torch.float32, pattern="constant"),
        dict(name="fp8", seed=3, N=[9 + r for r in range(R)], H=256, E=E, K=4, fp8=True, drop=0.1),
        dict(name="fp16-async", seed=4, N=20, H=96, E=E, K=2, dtype=torch.float16, async_=True),
        dict(name="fp8-async", seed=5, N=10, H=128, E=E, K=2, fp8=True, async_=True),
        dict(name="zero-tokens-on-rank-1", seed=6, N=[0 if r == min(1, R - 1) else 14 for r in range(R)], H=64, E=E, K=2),
        dict(name="every-token-one-expert", seed=7, N=15, H=64, E=E, K=3, pattern="one_expert", expert=E - 1),
        dict(name="all-minus-one", seed=8, N=11, H=64, E=E, K=2, pattern="all_neg"),
        dict(name="top-1", seed=9, N=17, H=40, E=E, K=1, dtype=torch.float32),
        dict(name="experts=ranks", seed=10, N=13, H=64, E=R, K=min(2, R)),
        dict(name="256-experts-top-8", seed=11, N=24, H=128, E=256 - 256 % R, K=8),
        dict(name="alignment-4", seed=12, N=19, H=32, E=E, K=3, align=4, drop=0.3),
        dict(name="odd-hidden-fp32", seed=13, N=10, H=33, E=E, K=2, dtype=torch.float32),
        # most tokens reach every rank: on 2 ranks dispatch sends runs of tokens straight from x and
        # combine sums long spans of tokens at once, as the rows come back in pieces
        dict(name="long-spans", seed=14, N=[1100 - 7 * r for r in range(R)], H=64, E=E, K=min(6, E), drop=0.03),
        dict(name="long-spans-fp8", seed=15, N=[290 + 5 * r for r in range(R)], H=256, E=E, K=min(6, E), fp8=True,
             drop=0.03, async_=True),
    ]


# ----------------------------------------------------------------------------- rank side
def _as_on_gpu() -> None:
    """Make this rank's data path take the choices it takes for CUDA tensors on NCCL (one batch
    of messages per hop, combine rows in one piece, indexed sums, no runs straight from x), so
    that their logic runs here over Gloo: what differs on a GPU is then only the kernels."""
    import sys

    for name, module in list(sys.modules.items()):
        if name.startswith("moeflow.") and hasattr(module, "host_driven"):
            module.host_driven = lambda device: False


def _run_cases(cases, as_on_gpu=False):
    R, rank = dist.get_world_size(), dist.get_rank()
    buffer = Buffer(dist.group.WORLD)
    if as_on_gpu:
        _as_on_gpu()
    results = []
    for case in cases:
        x, idx, w = make_case_inputs(case, rank, R)
        a = case.get("async_", False)
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, case["E"])
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx, topk_weights=w, expert_alignment=case.get("align", 1), async_finish=a)
        pending = event.is_pending()
        event.current_stream_wait()
        y = expert_fn(recv_x)
        combined, combined_w, event = buffer.combine(y, handle, topk_weights=recv_w, async_finish=a)
        event.current_stream_wait()
        cached_x, c_idx, c_w, c_counts, _, event = buffer.dispatch(x, handle=handle, async_finish=a)
        event.current_stream_wait()
        same_cached = _tensors_equal(cached_x, recv_x) and c_idx is None and c_w is None and c_counts is None
        plain, _, _ = buffer.combine(recv_x if not isinstance(recv_x, tuple) else y, handle)
        results.append(dict(x=x, idx=idx, w=w, recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w, counts=counts,
                            y=y, combined=combined, combined_w=combined_w, plain=plain, pending=pending,
                            same_cached=same_cached, in_rank=in_rank, per_rank=per_rank, per_expert=per_expert,
                            per_rdma=per_rdma, cut=[r is not None for r in handle.plan.hops[0].send_runs]))
    return results


def _tensors_equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_tensors_equal(p, q) for p, q in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ----------------------------------------------------------------------------- parent side
def _check_case(case, per_rank_results, R, as_on_gpu=False):
    name = case["name"]
    xs = [r["x"] for r in per_rank_results]
    idxs = [r["idx"] for r in per_rank_results]
    ws = [r["w"] for r in per_rank_results]
    ref = ref_dispatch(xs, idxs, ws, case["E"], case.get("align", 1))
    for d, (got, exp) in enumerate(zip(per_rank_results, ref)):
        where = f"{name}, rank {d}"
        if case.get("fp8"):
            assert _tensors_equal(got["recv_x"][0], exp["recv_x"]), where
            assert torch.equal(got["recv_x"][1], exp["recv_scales"]), where
        else:
            assert _tensors_equal(got["recv_x"], exp["recv_x"]), where
        assert torch.equal(got["recv_idx"], exp["recv_topk_idx"]), where
        assert torch.equal(got["recv_w"], exp["recv_topk_weights"]), where
        assert got["counts"] == exp["counts"], where
        assert got["same_cached"], f"{where}: cached dispatch differs from fresh"
        assert got["per_rdma"] is None
        if as_on_gpu:
            assert not any(got["cut"]), where
        elif name.startswith("long-spans") and R == 2:  # the other rank's tokens go straight from x, run by run
            assert got["cut"] == [r != d for r in range(R)], where
        # layout: counts derived from topk_idx on the source rank
        idx = got["idx"]
        E, L = case["E"], case["E"] // R
        exp_in_rank = torch.zeros(idx.size(0), R, dtype=torch.bool)
        exp_per_expert = torch.zeros(E, dtype=torch.int64)
        for t in range(idx.size(0)):
            for e in idx[t].tolist():
                if e >= 0:
                    exp_in_rank[t, e // L] = True
                    exp_per_expert[e] += 1
        assert torch.equal(got["in_rank"], exp_in_rank), where
        assert got["per_rank"].tolist() == exp_in_rank.sum(0).tolist(), where
        assert got["per_expert"].tolist() == exp_per_expert.tolist(), where
        if case.get("async_") and exp["recv_x"].size(0) > 0:
            assert got["pending"], f"{where}: async dispatch returned an already-finished event"
    ys = [expert_fn(r["recv_x"]) for r in per_rank_results]
    num_tokens = [x[0].size(0) if isinstance(x, tuple) else x.size(0) for x in xs]
    H = case["H"]
    dtype = ys[0].dtype
    ref_comb, ref_w = ref_combine(ys, [e["origin"] for e in ref], num_tokens, H, dtype,
                                  [e["recv_topk_weights"] for e in ref])
    for s, got in enumerate(per_rank_results):
        assert _tensors_equal(got["combined"], ref_comb[s]), f"{name}, rank {s}: combine"
        assert torch.equal(got["combined_w"], ref_w[s]), f"{name}, rank {s}: combined weights"
        # Summing a token's weights over ranks rebuilds its weights where it had an expert.
        exp_w = torch.where(got["idx"] >= 0, got["w"], 0.0)
        torch.testing.assert_close(got["combined_w"], exp_w, rtol=0, atol=1e-6)
        if not case.get("fp8"):
            # combine(dispatch(x)) / ranks hit == x
            hits = got["in_rank"].sum(1, keepdim=True).clamp(min=1).float()
            back = got["plain"].float() / hits
            x = got["x"].float()
            keep = got["in_rank"].any(1)
            if dtype == torch.float32:
                rel = ((back - x).abs().max() / x.abs().max().clamp(min=1e-12)).item() if keep.any() else 0.0
                assert rel < 5e-6, f"{name}, rank {s}: combine(dispatch(x))/hits off by {rel}"
            else:
                ref_plain, _ = ref_combine([r["recv_x"] for r in per_rank_results], [e["origin"] for e in ref],
                                           num_tokens, H, dtype)
                assert _tensors_equal(got["plain"], ref_plain[s])
            assert torch.all(got["plain"][~keep] == 0), f"{name}, rank {s}: unrouted tokens must combine to 0"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_dispatch_combine_match_reference(world_size):
    cases = cases_for(world_size)
    if world_size == 8:
        cases = [c for c in cases if c["name"] in ("random-bf16", "fp8", "zero-tokens-on-rank-1",
                                                   "256-experts-top-8", "fp16-async")]
    results = spawn(_run_cases, world_size, cases, timeout_s=240, collective_timeout_s=60)
    for i, case in enumerate(cases):
        _check_case(case, [results[r][i] for r in range(world_size)], world_size)


@pytest.mark.parametrize("world_size", [2, 3])
def test_dispatch_combine_match_reference_with_the_gpu_choices(world_size):
    """The same cases with the data path's CUDA/NCCL choices (see _as_on_gpu) over Gloo."""
    cases = cases_for(world_size)
    results = spawn(_run_cases, world_size, cases, True, timeout_s=240, collective_timeout_s=60)
    for i, case in enumerate(cases):
        _check_case(case, [results[r][i] for r in range(world_size)], world_size, as_on_gpu=True)


def test_constant_input_fp32_roundtrip_is_exact():
    """combine(dispatch(x)) / ranks hit == x to < 5e-6 relative, on 4 ranks with random routing."""
    case = dict(name="roundtrip", seed=21, N=64, H=512, E=16, K=6, dtype=torch.float32)
    results = spawn(_run_cases, 4, [case], timeout_s=120)
    _check_case(case, [r[0] for r in results], 4)


# ----------------------------------------------------------------------------- async really overlaps
LATE_S = 3.0  # how late rank 1 joins; long enough that a loaded machine's delays stay well below it


def _async_progress():
    """Rank 1 joins late; rank 0's async combine must return before rank 1 even arrives."""
    rank = dist.get_rank()
    buffer = Buffer()
    N, H, E = 2048, 512, 4
    torch.manual_seed(rank)
    x = torch.randn(N, H)
    idx = torch.randint(0, E, (N, 2))
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                 num_tokens_per_expert=per_expert, topk_idx=idx)
    expected, _, _ = buffer.combine(recv_x, handle)
    dist.barrier()
    if rank == 1:
        time.sleep(LATE_S)
    t0 = time.perf_counter()
    combined, _, event = buffer.combine(recv_x, handle, async_finish=True)
    t_return = time.perf_counter() - t0
    # The caller is busy (here: asleep) while the transfer proceeds.
    time.sleep(0.3)
    event.current_stream_wait()
    t_done = time.perf_counter() - t0
    cached, *_, event = buffer.dispatch(x, handle=handle, async_finish=True)
    event.current_stream_wait()
    return t_return, t_done, torch.equal(combined, expected), torch.equal(cached, recv_x)


def test_async_returns_before_transfer_completes():
    (r0_ret, r0_done, ok0, c0), (_, _, ok1, c1) = spawn(_async_progress, 2, timeout_s=60)
    assert ok0 and ok1 and c0 and c1
    assert r0_ret < LATE_S / 2, f"async combine blocked for {r0_ret:.2f} s waiting for the late rank"
    assert r0_done > LATE_S - 0.1, "rank 0 finished before rank 1 joined: the transfer cannot have happened"


# ----------------------------------------------------------------------------- byte counters
def _counted():
    buffer = Buffer()
    rank = dist.get_rank()
    N, H, E, K = 32, 128, 9, 2
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(N, H, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                      num_tokens_per_expert=per_expert, topk_idx=idx,
                                                      topk_weights=torch.rand(N, K, generator=g))
    buffer.combine(recv_x, handle)
    c = buffer.counters
    return (per_rank.tolist(), list(handle.num_recv_tokens_per_rank), c.sent, c.recv, dict(c.calls),
            c.wire_bytes("dispatch"), c.wire_bytes("combine"))


def test_byte_counters_per_peer():
    R = 3
    out = spawn(_counted, R, timeout_s=60)
    for rank, (per_rank, recv_rows, sent, recv, calls, wire_d, wire_c) in enumerate(out):
        # the Buffer's agreement at construction; two count exchanges on the first dispatch (see
        # Buffer._exchange_counts: the per-expert columns once every rank agreed on E)
        assert calls == {"agree": 1, "layout": 2, "dispatch": 1, "combine": 1}
        # dispatch row = 256 B of bf16 + 8 B of fp32 weights + 2 B of int8 ids + 4 B of int32
        # source token index (the handle's recv_src_idx), each metadata field padded to 8 B
        assert sent["dispatch"] == [n * 280 for n in per_rank]
        assert recv["dispatch"] == [n * 280 for n in recv_rows]
        assert sent["combine"] == [n * 256 for n in recv_rows]
        assert recv["combine"] == [n * 256 for n in per_rank]
        assert wire_d == sum(n * 280 for p, n in enumerate(per_rank) if p != rank)
        assert wire_c == sum(n * 256 for p, n in enumerate(recv_rows) if p != rank)
        # what one rank sent to another is what that rank received from it
        for peer in range(R):
            assert sent["dispatch"][peer] == out[peer][3]["dispatch"][rank]


# ----------------------------------------------------------------------------- dispatch without top-k
def _no_topk():
    rank = dist.get_rank()
    buffer = Buffer()
    g = torch.Generator().manual_seed(77 + rank)
    N, H, E = 10 + rank, 64, 6
    x = torch.randn(N, H, generator=g)
    idx = torch.randint(-1, E, (N, 2), generator=g)
    _, _, _, in_rank, _ = buffer.get_dispatch_layout(idx, E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(x, is_token_in_rank=in_rank)
    combined, none_w, _ = buffer.combine(recv_x, handle)
    return x, idx, recv_x, recv_idx, recv_w, counts, combined, none_w, in_rank


def test_dispatch_without_topk_moves_rows_only():
    out = spawn(_no_topk, 3, timeout_s=60)
    ref = ref_dispatch([o[0] for o in out], [o[1] for o in out], None, 6)
    for rank, (x, idx, recv_x, recv_idx, recv_w, counts, combined, none_w, in_rank) in enumerate(out):
        assert recv_idx is None and recv_w is None and counts is None and none_w is None
        assert torch.equal(recv_x, ref[rank]["recv_x"])
        hits = in_rank.sum(1, keepdim=True).float()
        assert torch.equal(combined, x * hits)  # fp32 sums of equal copies are exact for <= 3 copies
