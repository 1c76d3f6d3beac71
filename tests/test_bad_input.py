"""Bad input is a clear error naming the argument, the rank and the value, on every rank, never a hang."""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.distributed as dist

from moeflow import Buffer, spawn
from moeflow.quant import per_token_cast_to_fp8

pytestmark = pytest.mark.faults  # bad input: an error naming it on every rank, never a hang

N, H, E, K = 8, 256, 8, 2
# A rank that waited on a collective for its peer's bad input would take the process group's
# timeout; failing fast takes well under a second, and FAIL_FAST leaves room for a loaded machine.
COLLECTIVE_TIMEOUT, FAIL_FAST = 120, 60


def _inputs(rank):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(N, H, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g)
    return x, idx, w


def _dispatch(buffer, x, idx, w, layout_idx=None):
    """Dispatch with the layout of ``layout_idx`` (default ``idx``): a spoiled ``topk_idx`` must
    be caught by dispatch itself, not only by get_dispatch_layout."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx if layout_idx is None else layout_idx, E)
    return buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                           num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)


def _spoil(kind: str, rank: int, bad_ranks: tuple, x, idx, w):
    """Return (x, idx, w) with the named defect on the ranks in bad_ranks."""
    if rank not in bad_ranks:
        return x, idx, w
    if kind == "idx_out_of_range":
        idx = idx.clone()
        idx[3, 1] = E + 5
    elif kind == "idx_below_minus_one":
        idx = idx.clone()
        idx[0, 0] = -3
    elif kind == "idx_dtype":
        idx = idx.int()
    elif kind == "idx_shape":
        idx = idx[:-1]
    elif kind == "weights_dtype":
        w = w.double()
    elif kind == "weights_shape":
        w = w[:, :1]
    elif kind == "hidden_differs":
        x = x[:, :128].contiguous()
    elif kind == "dtype_differs":
        x = x.half()
    elif kind == "fp8_hidden":
        x = (torch.zeros(N, 100, dtype=torch.float8_e4m3fn), torch.ones(N, 1))
    elif kind == "x_int":
        x = torch.zeros(N, H, dtype=torch.int32)
    return x, idx, w


def _bad_dispatch(kind, bad_ranks):
    rank = dist.get_rank()
    buffer = Buffer()
    clean = _inputs(rank)
    x, idx, w = _spoil(kind, rank, bad_ranks, *clean)
    t0 = time.perf_counter()
    try:
        _dispatch(buffer, x, idx, w, layout_idx=clean[1])
    except (ValueError, TypeError) as e:
        return type(e).__name__, str(e), time.perf_counter() - t0
    return None, "", time.perf_counter() - t0


# kind, bad ranks, exception on the bad rank, pattern its message must match
DISPATCH_CASES = [
    ("idx_out_of_range", (1,), ValueError, r"`topk_idx` on rank 1 must lie in \[-1, 8\), found 13"),
    ("idx_below_minus_one", (0,), ValueError, r"`topk_idx` on rank 0 must lie in \[-1, 8\), found -3"),
    ("idx_dtype", (1,), TypeError, r"`topk_idx` on rank 1 must be int64, got torch.int32"),
    ("idx_shape", (0, 1), ValueError, r"`topk_idx` on rank \d must have shape \[8, \*\], got \[7, 2\]"),
    ("weights_dtype", (1,), TypeError, r"`topk_weights` on rank 1 must be float32, got torch.float64"),
    ("weights_shape", (0,), ValueError, r"`topk_weights` on rank 0 must have shape \[8, 2\], got \[8, 1\]"),
    ("fp8_hidden", (1,), ValueError, r"`x` on rank 1: FP8 hidden size 100 is not a multiple of 128"),
    ("x_int", (0,), TypeError, r"`x` on rank 0 must be bfloat16 or float16 or float32, got torch.int32"),
]


@pytest.mark.parametrize("kind,bad_ranks,exc,pattern", DISPATCH_CASES, ids=[c[0] for c in DISPATCH_CASES])
def test_bad_dispatch_input_fails_on_every_rank(kind, bad_ranks, exc, pattern):
    out = spawn(_bad_dispatch, 2, kind, bad_ranks, timeout_s=300, collective_timeout_s=COLLECTIVE_TIMEOUT)
    for rank, (name, msg, elapsed) in enumerate(out):
        assert elapsed < FAIL_FAST, f"rank {rank} took {elapsed:.1f} s to fail: it waited on a collective"
        if rank in bad_ranks:
            assert name == exc.__name__, (rank, name, msg)
            assert re.search(pattern, msg), msg
        else:
            # The good rank learns from the count exchange that a peer failed, and names it.
            assert name == "ValueError", (rank, name, msg)
            assert re.search(rf"rank\(s\) \[{bad_ranks[0]}\] passed invalid input", msg), msg


@pytest.mark.parametrize("kind,pattern", [
    ("hidden_differs", r"ranks disagree on hidden \(rank 0: 256, rank 1: 128\)"),
    ("dtype_differs", r"ranks disagree on dtype \(rank 0: bfloat16, rank 1: float16\)"),
])
def test_ranks_that_disagree_all_fail(kind, pattern):
    out = spawn(_bad_dispatch, 2, kind, (1,), timeout_s=300, collective_timeout_s=COLLECTIVE_TIMEOUT)
    for rank, (name, msg, elapsed) in enumerate(out):
        assert name == "ValueError" and re.search(pattern, msg), (rank, msg)
        assert elapsed < FAIL_FAST


def _local_errors():
    """Errors every rank makes alike: raised before any collective."""
    buffer = Buffer()
    x, idx, w = _inputs(dist.get_rank())
    msgs = {}

    def grab(key, fn):
        try:
            fn()
        except (ValueError, TypeError) as e:
            msgs[key] = (type(e).__name__, str(e))

    grab("layout_not_divisible", lambda: buffer.get_dispatch_layout(idx, 7))
    grab("layout_out_of_range", lambda: buffer.get_dispatch_layout(idx, 4))
    recv_x, _, recv_w, _, handle, _ = _dispatch(buffer, x, idx, w)
    grab("combine_rows", lambda: buffer.combine(recv_x[:-1], handle))
    grab("combine_hidden", lambda: buffer.combine(torch.zeros(recv_x.size(0), 64, dtype=torch.bfloat16), handle))
    grab("combine_fp8", lambda: buffer.combine(per_token_cast_to_fp8(recv_x.float()), handle))
    grab("combine_handle", lambda: buffer.combine(recv_x, ("not", "a", "handle")))
    grab("cached_with_topk", lambda: buffer.dispatch(x, handle=handle, topk_idx=idx))
    grab("cached_shape", lambda: buffer.dispatch(x[:-1], handle=handle))
    grab("alignment", lambda: _dispatch_with(buffer, x, idx, expert_alignment=0))
    # the group still works after all of that
    y, _, _ = buffer.combine(recv_x, handle)
    return msgs, y.shape == x.shape


def _dispatch_with(buffer, x, idx, **kw):
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
    return buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                           num_tokens_per_expert=per_expert, topk_idx=idx, **kw)


def test_local_errors_name_argument_rank_and_value():
    out = spawn(_local_errors, 2, timeout_s=60, collective_timeout_s=30)
    expected = {
        "layout_not_divisible": ("ValueError", r"`num_experts` on rank \d must be a positive multiple of the group size 2, got 7"),
        "layout_out_of_range": ("ValueError", r"`topk_idx` on rank \d must lie in \[-1, 4\), found \d"),
        "combine_rows": ("ValueError", r"`x` on rank \d must have shape \[\d+, \*\], got \[\d+, 256\]"),
        "combine_hidden": ("ValueError", r"`x` on rank \d has hidden 64 but the handle's dispatch had hidden 256"),
        "combine_fp8": ("TypeError", r"FP8 tuples are dispatch-only"),
        "combine_handle": ("TypeError", r"`handle` on rank \d must be a DispatchHandle .* got tuple"),
        "cached_with_topk": ("ValueError", r"cached dispatch \(with `handle`\) takes no `topk_idx`"),
        "cached_shape": ("ValueError", r"`x` on rank \d has shape \(7, 256\) but the handle was made for \[8, 256\]"),
        "alignment": ("ValueError", r"`expert_alignment` on rank \d must be a positive int, got 0"),
    }
    for rank, (msgs, still_works) in enumerate(out):
        assert still_works
        assert set(msgs) == set(expected), set(expected) ^ set(msgs)
        for key, (name, pattern) in expected.items():
            assert msgs[key][0] == name and re.search(pattern, msgs[key][1]), (key, msgs[key])


def test_buffer_needs_an_initialised_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        Buffer()
