"""``num_chunks="auto"``: the chunk count of an MoE layer's token pipeline, chosen by timing it.

Which chunk count is fastest depends on the machine more than on any rule: more chunks hide
more communication behind the experts but pay per-message latency and smaller GEMMs, and on a
CPU smaller chunks can even compute faster (they stay in cache) or slower (more, smaller
matmuls). So the layer measures: for each token count T (rounded up to a power of two) it runs
``TRIALS`` steps at each candidate count in turn, takes the shortest time of each (other work on
the machine only ever adds time, so the minimum is the steadiest estimate), agrees on the
slowest rank's figures with one all-reduce, and keeps the fastest count (the fewest chunks on a
tie) for that T from then on. Every rank sees the same T (the layer agrees on the largest
first) and runs the same trials in the same order, so all pick the same count.

A trial's time is the layer's routed part (dispatch, experts, combine) forward and, when the
forward is differentiated, its backward too: the backward's transfers and GEMMs rank the counts
differently from the forward's (seen on 4 CPU ranks: the forward alone preferred 4 chunks, the
step was 10% faster with 2). A :class:`BackwardClock` around the routed part adds the backward's
time to its trial's, so the choice is made at the forward after the last trial, once that
trial's backward has run. Forwards that are never differentiated (inference) are timed alone.

Candidates: 1, 2 and 4 chunks, a count only when its chunks hold at least ``MIN_TOKENS`` tokens.
On CUDA the clock waits for the device (one synchronize at each end of a trial's forward and
backward, none after the trials).
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["ChunkTuner", "BackwardClock"]

CANDIDATES = (1, 2, 4)
MIN_TOKENS = 256   # a chunk of fewer tokens pays more in per-message latency than it can hide
TRIALS = 5         # forwards timed per candidate (the shortest counts): slow outliers do not decide


class ChunkTuner:
    """Per-T chunk counts for one layer; see the module docstring.

    Args:
        all_reduce: in-place all-reduce over the expert-parallel group taking an ``op`` keyword
            (the layer's ``Buffer.all_reduce``), or None on one rank.
    """

    def __init__(self, all_reduce: Optional[Callable[..., torch.Tensor]]) -> None:
        self._all_reduce = all_reduce
        self.chosen: dict[int, int] = {}                 # T bucket -> chunk count
        self._times: dict[int, list[list[float]]] = {}   # T bucket -> seconds per candidate
        self._device = torch.device("cpu")

    @staticmethod
    def candidates(T: int) -> list[int]:
        return [c for c in CANDIDATES if c == 1 or T // c >= MIN_TOKENS]

    def next(self, T: int) -> tuple[int, bool]:
        """``(chunk count, timed)`` for a forward of T tokens (T already agreed by every rank).
        The forward after the last trial of T's bucket agrees on the choice (one all-reduce)."""
        bucket = 1 << max(T - 1, 0).bit_length()
        if bucket in self.chosen:
            return self.chosen[bucket], False
        cands = self.candidates(bucket)
        if len(cands) == 1:
            self.chosen[bucket] = 1
            return 1, False
        times = self._times.setdefault(bucket, [[] for _ in cands])
        if min(len(t) for t in times) >= TRIALS:
            self._decide(bucket, cands, times)
            return self.chosen[bucket], False
        done = sum(len(t) for t in times)
        return cands[done % len(cands)], True

    def start(self, device: torch.device) -> float:
        self._device = device  # where the agreement's all-reduce runs (NCCL: the GPU)
        _sync(device)
        return time.perf_counter()

    def stop(self, T: int, chunks: int, t0: float, device: torch.device) -> list[float]:
        """The trial forward of ``chunks`` chunks that began at ``t0`` (:meth:`start`) is over;
        returns its entry (see :meth:`record`)."""
        _sync(device)
        return self.record(T, chunks, time.perf_counter() - t0)

    def record(self, T: int, chunks: int, seconds: float) -> list[float]:
        """One trial's time; returns its entry, ``[seconds]``, to which a :class:`BackwardClock`
        adds the trial's backward before the choice is made."""
        bucket = 1 << max(T - 1, 0).bit_length()
        entry = [seconds]
        self._times[bucket][self.candidates(bucket).index(chunks)].append(entry)
        return entry

    def _decide(self, bucket: int, cands: list[int], times: list[list[list[float]]]) -> None:
        best = torch.tensor([min(e[0] for e in t) for t in times], dtype=torch.float64, device=self._device)
        if self._all_reduce is not None:
            # the slowest rank decides, and every rank gets the same numbers: the same choice
            self._all_reduce(best, op=dist.ReduceOp.MAX)
        self.chosen[bucket] = cands[int(torch.argmin(best))]  # host sync, once; argmin: fewest chunks on a tie
        del self._times[bucket]


class BackwardClock:
    """Adds the backward of a trial's routed part to its entry: :meth:`exit` wraps the part's
    output (its gradient arriving starts the clock), :meth:`enter` its input (the input's
    gradient leaving stops it). Both are identities in the forward.

    An activation-checkpoint recompute of a trial forward must run the trial's chunk count (the
    tensors it saves depend on it), not the next trial's: the layer queues each trial's clock in
    ``pending`` (``chunks`` is the count), a recompute takes the oldest one (backwards run in the
    order of their forwards), and the end of the trial's backward removes it if no recompute did.
    """

    def __init__(self, device: torch.device, chunks: int, pending: "collections.deque[BackwardClock]"):
        self.device, self.chunks, self.pending = device, chunks, pending
        self.entry: Optional[list[float]] = None  # the trial's, once its forward is over
        self.started: Optional[float] = None
        pending.append(self)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return _Clock.apply(x, self, False)

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        return _Clock.apply(y, self, True)

    def tick(self, starts: bool) -> None:
        _sync(self.device)
        now = time.perf_counter()
        if starts:
            self.started = now
        else:
            if self.started is not None and self.entry is not None:
                self.entry[0] += now - self.started
                self.started = None
            if self in self.pending:  # its backward is over: no recompute will need its count
                self.pending.remove(self)


class _Clock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, clock: BackwardClock, starts: bool):
        ctx.clock, ctx.starts = clock, starts
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.tick(ctx.starts)
        return grad, None, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the clock must see the device's work, not its launch
