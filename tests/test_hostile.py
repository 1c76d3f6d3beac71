"""Hostile input: random layouts, sizes, dtypes and NaN/Inf against the single-process reference;
malformed arguments are errors that name them.

Hypothesis draws a batch of cases per world size up front; one spawn runs the whole batch (a
spawn per case would take minutes). Each case fixes a seed and the shapes; every rank builds its
own inputs from ``(case, rank)`` and the parent rebuilds all of them for the reference in
``tests/_reference.py``. NaN/Inf in ``x`` must travel like any other value (bitwise, NaN
payload aside). ``tests/test_bad_input.py`` covers the first set of malformed arguments; the
table here covers the rest.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _reference import ref_combine, ref_dispatch
from moeflow import Buffer, spawn
from moeflow.quant import FP8_BLOCK

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


@st.composite
def cases(draw, world_size: int):
    dtype = draw(st.sampled_from(list(DTYPES)))
    hidden = draw(st.sampled_from([128, 256]) if dtype == "fp8" else st.sampled_from([1, 2, 3, 5, 7, 17, 33, 130]))
    num_local_experts = draw(st.integers(1, 3))
    num_experts = world_size * num_local_experts
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        hidden=hidden, dtype=dtype, num_experts=num_experts,
        num_topk=draw(st.integers(1, min(num_experts, 4))),
        # 0 tokens: an empty rank; up to 9 keeps a batch fast
        num_tokens=draw(st.lists(st.integers(0, 9), min_size=world_size, max_size=world_size)),
        minus_one=draw(st.sampled_from([0.0, 0.3, 1.0])),  # share of -1 entries (1.0: nothing goes anywhere)
        skew=draw(st.booleans()),  # every token to the experts of rank 0 only
        nonfinite=draw(st.booleans()),
        weights=draw(st.booleans()),
        async_finish=draw(st.booleans()),
        alignment=draw(st.sampled_from([1, 1, 2, 5])),
    )


def case_inputs(case: dict, rank: int, world_size: int):
    """``(x, topk_idx, topk_weights)`` of one rank; x is a tensor or an FP8 tuple."""
    g = torch.Generator().manual_seed(case["seed"] * 31 + rank)
    N, H, E, K = case["num_tokens"][rank], case["hidden"], case["num_experts"], case["num_topk"]
    x = torch.randn(N, H, generator=g) * 4
    if case["nonfinite"] and N:
        rows = torch.randint(0, N, (2,), generator=g)
        x[rows[0], torch.randint(0, H, (1,), generator=g)] = float("nan")
        x[rows[1], 0] = float("inf")
        x[rows[1], -1] = -float("inf")
    pool = E // world_size if case["skew"] else E  # skew: only rank 0's experts
    idx = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(N)]) if N and K <= pool else \
        torch.full((N, K), -1, dtype=torch.int64)
    idx = idx.view(N, K)
    drop = torch.rand(N, K, generator=g) < case["minus_one"]
    idx = torch.where(drop, -1, idx)
    w = torch.rand(N, K, generator=g) if case["weights"] else None
    if case["dtype"] == "fp8":
        x_fp8 = x.clamp(-448, 448).nan_to_num(posinf=448, neginf=-448).to(torch.float8_e4m3fn)
        if case["nonfinite"] and N:
            x_fp8[0, 1] = float("nan")  # e4m3fn has NaN (no Inf)
        scales = torch.rand(N, H // FP8_BLOCK, generator=g) + 0.5
        if case["nonfinite"] and N:
            scales[-1, 0] = float("inf")
        return (x_fp8, scales), idx, w
    return x.to(DTYPES[case["dtype"]]), idx, w


def expert_stand_in(recv_x) -> torch.Tensor:
    """What the ranks combine: the received rows as a float tensor (FP8: dequantised)."""
    if isinstance(recv_x, tuple):
        q, s = recv_x
        return (q.float().view(q.size(0), -1, FP8_BLOCK) * s.unsqueeze(-1)).view(q.shape)
    return recv_x


def _run_cases(case_list: list):
    rank, R = dist.get_rank(), dist.get_world_size()
    buffer = Buffer()
    results = []
    for case in case_list:
        x, idx, w = case_inputs(case, rank, R)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, case["num_experts"])
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx, topk_weights=w, expert_alignment=case["alignment"], async_finish=case["async_finish"])
        event.current_stream_wait()
        y = expert_stand_in(recv_x)
        combined, combined_w, event = buffer.combine(y, handle, topk_weights=recv_w, async_finish=case["async_finish"])
        event.current_stream_wait()
        cached, *_ = buffer.dispatch(x, handle=handle)
        results.append(dict(recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w, counts=counts, combined=combined,
                            combined_w=combined_w, cached=cached, per_rank=per_rank, in_rank=in_rank))
    return results


def _same(actual, expected, what: str) -> None:
    if isinstance(expected, tuple):
        for a, e, part in zip(actual, expected, ("[0]", "[1]")):
            _same(a, e, what + part)
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        (what, actual.dtype, expected.dtype, actual.shape, expected.shape)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=0, equal_nan=True, msg=what)


def _check(case: dict, world_size: int, outs: list) -> None:
    inputs = [case_inputs(case, r, world_size) for r in range(world_size)]
    xs = [i[0] for i in inputs]
    idxs = [i[1] for i in inputs]
    ws = [i[2] for i in inputs] if case["weights"] else None
    ref = ref_dispatch(xs, idxs, ws, case["num_experts"], case["alignment"])
    ys = [expert_stand_in(o["recv_x"]) for o in outs]
    H = case["hidden"]
    out_dtype = ys[0].dtype
    comb, comb_w = ref_combine(ys, [r["origin"] for r in ref], case["num_tokens"], H, out_dtype,
                               [o["recv_w"] for o in outs] if case["weights"] else None)
    for d, (o, r) in enumerate(zip(outs, ref)):
        tag = f"{case} rank {d}"
        exp_x = (r["recv_x"], r["recv_scales"]) if case["dtype"] == "fp8" else r["recv_x"]
        _same(o["recv_x"], exp_x, "recv_x " + tag)
        _same(o["cached"], exp_x, "cached recv_x " + tag)
        assert torch.equal(o["recv_idx"], r["recv_topk_idx"]), tag
        if case["weights"]:
            _same(o["recv_w"], r["recv_topk_weights"], "recv_w " + tag)
            _same(o["combined_w"], comb_w[d], "combined_w " + tag)
        else:
            assert not o["recv_w"].any(), tag
        assert o["counts"] == r["counts"], tag
        _same(o["combined"], comb[d], "combined " + tag)
        # the layout itself, from the raw ids
        assert o["in_rank"].sum(0).tolist() == o["per_rank"].tolist(), tag


def _run_batch(world_size: int, batch: list) -> None:
    outs = spawn(_run_cases, world_size, batch, timeout_s=240, threads_per_rank=1)
    for i, case in enumerate(batch):
        _check(case, world_size, [o[i] for o in outs])


@pytest.mark.parametrize("world_size,batch_size", [(1, 25), (2, 25), (4, 12)])
def test_random_cases_match_the_reference(world_size, batch_size):
    @settings(max_examples=1, deadline=None, database=None,
              suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow])
    @given(st.lists(cases(world_size), min_size=batch_size, max_size=batch_size))
    def run(batch):
        _run_batch(world_size, batch)

    run()


def test_handpicked_corners_match_the_reference():
    """Corners a random draw can miss: every rank empty, one hidden unit, all -1, all NaN."""
    base = dict(seed=3, hidden=1, dtype="bf16", num_experts=4, num_topk=2, minus_one=0.0, skew=False,
                nonfinite=False, weights=True, async_finish=False, alignment=1)
    batch = [dict(base, num_tokens=[0, 0]), dict(base, num_tokens=[5, 0]), dict(base, num_tokens=[4, 3], minus_one=1.0),
             dict(base, num_tokens=[6, 6], nonfinite=True, hidden=3, dtype="fp16"),
             dict(base, num_tokens=[3, 8], skew=True, num_topk=2, hidden=1, dtype="fp32", async_finish=True),
             dict(base, num_tokens=[7, 2], dtype="fp8", hidden=128, nonfinite=True)]
    _run_batch(2, batch)


# --------------------------------------------------------------------------- NaN/Inf detection

def _finite_checks():
    rank = dist.get_rank()
    buffer = Buffer(check_finite=True)
    x = torch.randn(8, 16)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(8)])
    if rank == 1:
        x[5, 3] = float("nan")
    msgs = {}
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    try:
        buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, topk_idx=idx)
    except ValueError as e:
        msgs["dispatch"] = str(e)
    x = x.nan_to_num()
    w = torch.rand(8, 2)
    if rank == 0:
        w[2, 1] = float("inf")
    try:
        buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
    except ValueError as e:
        msgs["weights"] = str(e)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                 num_tokens_per_expert=per_expert, topk_idx=idx)
    bad = recv_x.clone()
    if bad.size(0):
        bad[-1, 0] = -float("inf")
    try:
        buffer.combine(bad, handle)  # local check: raised before the transfer, on this rank only
    except ValueError as e:
        msgs["combine"] = str(e)
    buffer.combine(recv_x, handle)  # the group still works
    return msgs, recv_x.size(0)


@pytest.mark.faults
def test_check_finite_names_rank_argument_and_row():
    out = spawn(_finite_checks, 2, timeout_s=60)
    for rank, (msgs, recv_rows) in enumerate(out):
        if rank == 1:
            assert re.search(r"Buffer.dispatch: `x` on rank 1 holds a non-finite value \(nan\) in row 5 "
                             r"\(1 bad rows of 8\)", msgs["dispatch"]), msgs
            assert re.search(r"rank\(s\) \[0\] passed invalid input", msgs["weights"]), msgs
        else:
            assert re.search(r"rank\(s\) \[1\] passed invalid input", msgs["dispatch"]), msgs
            assert re.search(r"`topk_weights` on rank 0 holds a non-finite value \(inf\) in row 2", msgs["weights"])
        if recv_rows:
            assert re.search(rf"Buffer.combine: `x` on rank {rank} holds a non-finite value \(-inf\) in row "
                             rf"{recv_rows - 1}", msgs["combine"]), msgs


# --------------------------------------------------------------------------- malformed arguments
# Not in tests/test_bad_input.py. Fresh-dispatch mistakes are made on both ranks alike (each
# raises its own error after the count exchange); combine mistakes are raised before any transfer.

def _malformed():
    rank = dist.get_rank()
    buffer = Buffer()
    N, H, E = 8, 128, 4
    x = torch.randn(N, H)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(N)])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
    fresh = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                 topk_idx=idx)
    msgs = {}

    def grab(key, fn):
        try:
            fn()
            msgs[key] = ("no error", "")
        except (ValueError, TypeError) as e:
            msgs[key] = (type(e).__name__, str(e))

    q = torch.zeros(N, H, dtype=torch.float8_e4m3fn)
    grab("x_list", lambda: buffer.dispatch(x.tolist(), **fresh))
    grab("x_1d", lambda: buffer.dispatch(x[0], **fresh))
    grab("fp8_one_item", lambda: buffer.dispatch((q,), **fresh))
    grab("fp8_scales_shape", lambda: buffer.dispatch((q, torch.ones(N, 2)), **fresh))
    grab("no_is_token_in_rank", lambda: buffer.dispatch(x, **dict(fresh, is_token_in_rank=None)))
    grab("in_rank_dtype", lambda: buffer.dispatch(x, **dict(fresh, is_token_in_rank=in_rank.int())))
    grab("in_rank_shape", lambda: buffer.dispatch(x, **dict(fresh, is_token_in_rank=in_rank[:, :1])))
    grab("per_rank_shape", lambda: buffer.dispatch(x, **dict(fresh, num_tokens_per_rank=per_rank[:1])))
    grab("no_per_expert", lambda: buffer.dispatch(x, **dict(fresh, num_tokens_per_expert=None)))
    grab("per_expert_2d", lambda: buffer.dispatch(x, **dict(fresh, num_tokens_per_expert=per_expert.view(1, -1))))
    grab("weights_without_idx", lambda: buffer.dispatch(x, **dict(fresh, topk_idx=None, num_tokens_per_expert=None),
                                                        topk_weights=torch.rand(N, 2)))
    # ranks that disagree on top-k and on weights (tests/test_bad_input.py: hidden and dtype)
    top1 = dict(topk_idx=idx[:, :1], num_tokens_per_expert=buffer.get_dispatch_layout(idx[:, :1], E)[2])
    grab("topk_differs", lambda: buffer.dispatch(x, **dict(fresh, **(top1 if rank else {}))))
    stale = per_expert + torch.tensor([1, -1, 0, 0], dtype=per_expert.dtype)  # as many pairs, other experts
    grab("stale_counts", lambda: buffer.dispatch(x, **dict(fresh, num_tokens_per_expert=stale if rank else per_expert)))
    grab("weights_differ", lambda: buffer.dispatch(x, **fresh, topk_weights=torch.rand(N, 2) if rank else None))
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, **fresh)
    M = recv_x.size(0)
    grab("combine_weights_dtype", lambda: buffer.combine(recv_x, handle, topk_weights=torch.rand(M, 2).double()))
    grab("combine_three_biases", lambda: buffer.combine(recv_x, handle, bias=(x, x, x)))
    grab("combine_bias_shape", lambda: buffer.combine(recv_x, handle, bias=x[:-1]))
    grab("buffer_timeout", lambda: Buffer(timeout_s=-1))
    grab("buffer_check_finite", lambda: Buffer(check_finite="yes"))
    y, _, _ = buffer.combine(recv_x, handle)  # the group still works after all of that
    return msgs, y.shape == x.shape


MALFORMED = {
    "x_list": ("TypeError", r"`x` on rank \d must be a tensor, got list"),
    "x_1d": ("ValueError", r"`x` on rank \d must have shape \[\*, \*\], got \[128\]"),
    "fp8_one_item": ("TypeError", r"`x` on rank \d: an FP8 tuple must be .* got 1 items"),
    "fp8_scales_shape": ("ValueError", r"`x\[1\]` on rank \d must have shape \[8, 1\], got \[8, 2\]"),
    "no_is_token_in_rank": ("ValueError", r"`is_token_in_rank` on rank \d is required"),
    "in_rank_dtype": ("TypeError", r"`is_token_in_rank` on rank \d must be bool, got torch.int32"),
    "in_rank_shape": ("ValueError", r"`is_token_in_rank` on rank \d must have shape \[8, 2\], got \[8, 1\]"),
    "per_rank_shape": ("ValueError", r"`num_tokens_per_rank` on rank \d must have shape \[2\], got \[1\]"),
    "no_per_expert": ("ValueError", r"`num_tokens_per_expert` on rank \d is required with `topk_idx`"),
    "per_expert_2d": ("TypeError", r"`num_tokens_per_expert` on rank \d must be a 1-D tensor"),
    "weights_without_idx": ("ValueError", r"`topk_weights` on rank \d given without `topk_idx`"),
    "topk_differs": ("ValueError", r"ranks disagree on num_topk \(rank 0: 2, rank 1: 1\)"),
    # counts of another batch on rank 1: every rank stops
    "stale_counts": ("ValueError", r"(`num_tokens_per_expert` on rank 1 does not count `topk_idx`: expert \d+ has \d+ "
                                   r"pairs in it, \d+ in topk_idx|rank\(s\) \[1\] passed invalid input)"),
    "weights_differ": ("ValueError", r"ranks disagree on has topk_weights \(rank 0: 0, rank 1: 1\)"),
    "combine_weights_dtype": ("TypeError", r"`topk_weights` on rank \d must be float32, got torch.float64"),
    "combine_three_biases": ("ValueError", r"`bias` on rank \d takes at most 2 tensors, got 3"),
    "combine_bias_shape": ("ValueError", r"`bias\[0\]` on rank \d must have shape \[8, 128\], got \[7, 128\]"),
    "buffer_timeout": ("ValueError", r"timeout_s must be a positive finite number of seconds, got -1"),
    "buffer_check_finite": ("TypeError", r"`check_finite` must be a bool, got 'yes'"),
}


@pytest.mark.faults
def test_malformed_arguments_name_themselves():
    out = spawn(_malformed, 2, timeout_s=60, collective_timeout_s=30)
    for rank, (msgs, still_works) in enumerate(out):
        assert still_works
        assert set(msgs) == set(MALFORMED)
        for key, (name, pattern) in MALFORMED.items():
            assert msgs[key][0] == name and re.search(pattern, msgs[key][1]), (rank, key, msgs[key])
    with pytest.raises(ValueError, match=r"spawn: world_size must be a positive int, got 0"):
        spawn(_malformed, 0)
