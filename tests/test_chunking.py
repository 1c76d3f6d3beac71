"""num_chunks="auto": the ChunkTuner's trials, agreement and choice (pure, no ranks)."""

from __future__ import annotations

import collections
import time

import torch

from moeflow.chunking import MIN_TOKENS, TRIALS, BackwardClock, ChunkTuner


def _run_trials(tuner, T, seconds_per_chunks, backward_seconds=None):
    """Feed the tuner's trials with fixed timings (forward, and backward added to the entry as
    the layer's BackwardClock does); returns the counts it tried, in order."""
    tried = []
    while True:
        C, timed = tuner.next(T)
        if not timed:
            return tried
        tried.append(C)
        entry = tuner.record(T, C, seconds_per_chunks[C])
        if backward_seconds is not None:
            entry[0] += backward_seconds[C]


def test_auto_times_each_candidate_then_keeps_the_fastest():
    tuner = ChunkTuner(None)
    tried = _run_trials(tuner, 4096, {1: 0.30, 2: 0.20, 4: 0.25})
    assert sorted(tried) == sorted([1, 2, 4] * TRIALS) and tried[:3] == [1, 2, 4]
    assert tuner.next(4096) == (2, False) and tuner.next(3000) == (2, False)   # same power-of-two bucket
    assert tuner.next(2 * MIN_TOKENS - 1)[0] == 1 and tuner.next(2 * MIN_TOKENS - 1)[1]  # a new bucket: trials
    assert ChunkTuner.candidates(MIN_TOKENS) == [1] and ChunkTuner.candidates(4 * MIN_TOKENS) == [1, 2, 4]
    assert ChunkTuner(None).next(100) == (1, False)                                    # nothing to try


def test_ranks_agree_on_the_slowest_ranks_times():
    seen = []

    def all_reduce(t, op):
        seen.append((t.clone(), op))
        t.copy_(torch.tensor([0.5, 0.1, 0.9], dtype=t.dtype))   # another rank was slow at C=1 and C=4
        return t

    tuner = ChunkTuner(all_reduce)
    _run_trials(tuner, 4096, {1: 0.10, 2: 0.30, 4: 0.40})    # this rank alone would take C=1
    assert len(seen) == 1 and seen[0][1] == torch.distributed.ReduceOp.MAX
    assert tuner.next(4096) == (2, False)


def test_a_tie_takes_the_fewest_chunks():
    tuner = ChunkTuner(None)
    _run_trials(tuner, 4096, {1: 0.2, 2: 0.2, 4: 0.2})
    assert tuner.next(4096) == (1, False)


def test_the_choice_counts_the_backward_of_each_trial():
    tuner = ChunkTuner(None)
    # the forward alone favours 4 chunks, the whole step 2
    _run_trials(tuner, 4096, {1: 0.30, 2: 0.25, 4: 0.20}, backward_seconds={1: 0.6, 2: 0.5, 4: 0.7})
    assert tuner.next(4096) == (2, False)


class _SlowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.05)
        return grad * 2


def test_backward_clock_adds_the_time_between_its_ends():
    tuner = ChunkTuner(None)
    C, timed = tuner.next(4096)
    assert timed
    pending = collections.deque()
    clock = BackwardClock(torch.device("cpu"), C, pending)
    assert list(pending) == [clock]                 # a recompute of this forward would take its count
    x = torch.randn(8, requires_grad=True)
    y = _SlowBackward.apply(clock.enter(x))
    clock.entry = tuner.record(4096, C, 0.01)
    clock.exit(y).sum().backward()
    assert clock.entry[0] >= 0.01 + 0.05          # the forward's time and the backward's sleep
    assert torch.equal(x.grad, torch.full_like(x, 2.0))  # identities in forward and backward
    assert not pending                              # its backward is over: no recompute will need it


def _auto_layer():
    import torch.distributed as dist

    from moeflow import MoELayer

    rank = dist.get_rank()
    torch.manual_seed(0)
    auto = MoELayer(16, 8, 4, 2, num_chunks="auto")
    torch.manual_seed(0)
    fixed = MoELayer(16, 8, 4, 2, num_chunks=1)
    x = torch.randn(1024 - 100 * rank, 16, generator=torch.Generator().manual_seed(rank))  # ranks differ in T
    for _ in range(3 * TRIALS):
        auto(x.requires_grad_()).sum().backward()  # trials time forward and backward
    diff = (auto(x) - fixed(x)).abs().max().item()  # this forward agrees on the choice first
    return auto._chunk_tuner.chosen, diff


def test_auto_ranks_pick_the_same_count_and_compute_the_same_layer():
    from moeflow import spawn

    outs = spawn(_auto_layer, 2, timeout_s=120)
    assert outs[0][0] == outs[1][0] and list(outs[0][0]) == [1024]   # both ranks' T fall in 1024's bucket
    assert all(diff < 1e-5 for _, diff in outs)
